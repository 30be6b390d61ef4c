"""Approximate nearest-neighbour indexes: speed, recall and memory on embeddings.

  python benchmarks/ann.py                                   # synthetic 1,000,000 x 128
  python benchmarks/ann.py --bundle DIR --synthetic 0        # an exported bundle only
  python benchmarks/ann.py --embeddings emb.npy --synthetic 100000 --out /tmp/bench

Compares Faiss Flat (exact), HNSW, IVF-Flat, IVF-Flat with an HNSW coarse quantizer
(`IVF{nlist}_HNSW32,Flat`, the same k-means lists as IVF-Flat; `--ivf-codec SQfp16|SQ8` stores
its lists scalar-quantised, as the export's `ivf_hnsw` does) and IVF-PQ, plus Annoy and
hnswlib when they are
importable (`pip install -e .[ann]`), on (a) exported embeddings (`--bundle` or
`--embeddings`; a random 1,000 of them, at most 10%, become queries and leave the base) and
(b) a synthetic clustered set: a mixture of a few thousand Gaussian clusters (N/250, at most
4,000) whose centres scatter around 50 group centres (similar classes lie near each other),
with per-cluster scales and a spread mostly in a 16-d subspace per cluster (as learned
embeddings have a low intrinsic dimension), L2-normalised and searched by cosine; its queries
are fresh draws from the same mixture, not in the base.

Per index and search setting it reports build seconds, single-query latency (one query per
call on `--query-threads` threads, default 1, after warm-up; median and p99 in microseconds),
batched latency per query (one call with all queries, `--threads` threads), recall@10 against
exact search, the serialised index size and the process RSS growth during the build. HNSW
efSearch, IVF nprobe (with the quantizer's efSearch for ivf_hnsw) and Annoy search_k are swept
so the table shows the speed/recall trade-off. Writes `results.md`, `results.json` and one PNG
per data set (recall@10 against median latency) to `--out`, and prints the best setting with
recall@10 >= 0.95 against the 40 us single-query target, and each index's fastest such
setting as a ratio to IVF-Flat's in the same process.

Timings are wall-clock on whatever else the machine is running; compare rows of one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mltrain.retrieval.index import timed_single_queries  # noqa: E402
from mltrain.retrieval.index_types import INDEX_TYPES  # noqa: E402

try:
    from benchmarks.ann_data import K, clustered, load_inputs
    from benchmarks.ann_report import (
        Row,
        baseline_lines,
        per_gb_lines,
        plot,
        table,
        target_line,
    )
except ImportError:  # run as `python benchmarks/ann.py`
    from ann_data import K, clustered, load_inputs  # type: ignore[no-redef]
    from ann_report import (  # type: ignore[no-redef]
        Row,
        baseline_lines,
        per_gb_lines,
        plot,
        table,
        target_line,
    )


__all__ = ["clustered", "main"]  # the generator is also imported from here

# --- measurement ---------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def single_query_times(
    search_one: Callable[[np.ndarray], object],
    queries: np.ndarray,
    budget_s: float,
    min_queries: int = 100,
) -> np.ndarray:
    """Seconds per one-query call, after 10 warm-up calls; stops after `budget_s` once it has
    `min_queries` samples (20 when a call takes over 10 ms, as exact search at 1M does)."""
    timed = timed_single_queries(search_one, queries, warmups=10)
    times: list[float] = []
    start = time.perf_counter()
    for seconds, _ in timed:
        times.append(seconds)
        spent = time.perf_counter() - start
        enough = min_queries if spent / len(times) < 0.01 else 20  # slow (exact) searches
        if len(times) >= enough and spent > budget_s:
            break
    return np.asarray(times)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


# --- index families --------------------------------------------------------------------------


@dataclass
class Built:
    """A built index with its search-time knob."""

    name: str
    params: str
    build_s: float
    rss_mb: float
    nbytes: int
    ntotal: int
    knob: str  # efSearch | nprobe | nprobe/efSearch | search_k | ef | -
    values: list[Any]
    set_knob: Callable[[Any], None]
    search_batch: Callable[[np.ndarray], np.ndarray]  # (n, d) -> (n, K) ids
    search_one: Callable[[np.ndarray], object]
    obj: object = None


def _faiss_built(name, params, index, build_s, rss_mb, knob, values, setter) -> Built:
    nbytes = int(faiss.serialize_index(index).nbytes)
    return Built(
        name, params, build_s, rss_mb, nbytes, index.ntotal, knob, values, setter,
        lambda q: index.search(q, K)[1], lambda q: index.search(q, K), index,
    )  # fmt: skip


def package_index(name: str, base: np.ndarray, **args) -> faiss.Index:
    """An empty index built the way exports build it (`mltrain.retrieval.index_types.INDEX_TYPES`),
    for cosine search on the unit vectors this benchmark uses."""
    spec = {"name": name, "args": args}
    return INDEX_TYPES.build(spec, dim=base.shape[1], metric_type=faiss.METRIC_INNER_PRODUCT,
                             n_train=len(base))  # fmt: skip


def build_flat(base: np.ndarray, args) -> Built:
    r0, t = rss_bytes(), time.perf_counter()
    index = package_index("flat", base)
    index.add(base)
    return _faiss_built("flat", "exact", index, time.perf_counter() - t,
                        (rss_bytes() - r0) / 2**20, "-", [0], lambda v: None)  # fmt: skip


def build_hnsw(base: np.ndarray, args) -> Built:
    r0, t = rss_bytes(), time.perf_counter()
    index = package_index("hnsw", base, M=args.hnsw_m, ef_construction=args.hnsw_ef_construction)
    index.add(base)
    build_s, rss = time.perf_counter() - t, (rss_bytes() - r0) / 2**20

    def set_ef(v: int) -> None:
        index.hnsw.efSearch = v

    params = f"M={args.hnsw_m} efC={args.hnsw_ef_construction}"
    return _faiss_built("hnsw", params, index, build_s, rss, "efSearch", args.ef_values, set_ef)


def _nlist(n: int, args) -> int:
    if args.nlist:
        return min(args.nlist, n)
    return int(np.clip(round(4 * math.sqrt(n)), 1, max(1, n // 39)))


def _train_sample(base: np.ndarray, nlist: int, args) -> np.ndarray:
    n_train = min(len(base), max(args.train_per_list * nlist, 1000), args.max_train)
    pick = np.random.default_rng(1).choice(len(base), n_train, replace=False)
    return base[np.sort(pick)]


def _nprobe_values(nlist: int, args) -> list[int]:
    return sorted({min(v, nlist) for v in args.nprobe_values})


_COARSE: dict[tuple[int, int, int], tuple[np.ndarray, float]] = {}


def coarse_quantizer(base: np.ndarray, train: np.ndarray, nlist: int, args):
    """(quantizer, k-means seconds): IVF centroids computed once per data set and shared by
    IVF-Flat and IVF-PQ; the k-means time counts in both rows' build seconds."""
    key = (id(base), len(base), nlist)
    if key not in _COARSE:
        t = time.perf_counter()
        km = faiss.Kmeans(base.shape[1], nlist, niter=args.kmeans_iter, spherical=True, seed=1)
        km.train(train)
        _COARSE.clear()
        _COARSE[key] = (km.centroids.copy(), time.perf_counter() - t)
    centroids, seconds = _COARSE[key]
    quantizer = faiss.IndexFlatIP(base.shape[1])
    quantizer.add(centroids)
    return quantizer, seconds


# IVF-Flat and IVF-PQ are built here rather than through INDEX_TYPES: the benchmark trains one
# coarse quantizer per data set and shares it between them, so that the two rows differ only
# in how the lists store vectors (an export trains its own quantizer inside `index.train`).
def build_ivf_flat(base: np.ndarray, args) -> Built:
    d, nlist = base.shape[1], _nlist(len(base), args)
    train = _train_sample(base, nlist, args)
    quantizer, kmeans_s = coarse_quantizer(base, train, nlist, args)
    r0, t = rss_bytes(), time.perf_counter() - kmeans_s
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(train)  # centroids already trained: nothing to do
    index.add(base)
    build_s, rss = time.perf_counter() - t, (rss_bytes() - r0) / 2**20

    def set_nprobe(v: int) -> None:
        index.nprobe = v

    params = f"nlist={nlist} train={len(train):,}"
    values = _nprobe_values(nlist, args)
    return _faiss_built("ivf_flat", params, index, build_s, rss, "nprobe", values, set_nprobe)


def build_ivf_hnsw(base: np.ndarray, args) -> Built:
    """IVF-Flat whose coarse quantizer is an HNSW graph over the same centroids (the factory
    string `IVF{nlist}_HNSW32,Flat`): a query reaches its nearest lists in a few hundred
    distance computations instead of one per list, so more lists (shorter ones) pay."""
    d, nlist = base.shape[1], _nlist(len(base), args)
    train = _train_sample(base, nlist, args)
    flat, kmeans_s = coarse_quantizer(base, train, nlist, args)
    r0, t = rss_bytes(), time.perf_counter() - kmeans_s
    quantizer = faiss.IndexHNSWFlat(d, args.quantizer_m, faiss.METRIC_INNER_PRODUCT)
    quantizer.hnsw.efConstruction = 2 * args.quantizer_m
    quantizer.add(flat.reconstruct_n(0, nlist))
    if args.ivf_codec == "Flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:  # scalar-quantised lists: a quarter (SQ8) or half (SQfp16) of the bytes to scan
        qtype = {"SQ8": faiss.ScalarQuantizer.QT_8bit, "SQfp16": faiss.ScalarQuantizer.QT_fp16}
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, qtype[args.ivf_codec],
                                              faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        index.train(train)  # the codec only: the quantizer already holds its lists
    index.add(base)
    build_s, rss = time.perf_counter() - t, (rss_bytes() - r0) / 2**20

    def set_both(value: str) -> None:
        nprobe, ef = (int(v) for v in value.split("/"))
        index.nprobe, quantizer.hnsw.efSearch = nprobe, max(ef, nprobe)

    params = f"IVF{nlist}_HNSW{args.quantizer_m},{args.ivf_codec} train={len(train):,}"
    values = [f"{n}/{ef}" for n in _nprobe_values(nlist, args) for ef in args.quantizer_ef]
    return _faiss_built("ivf_hnsw", params, index, build_s, rss, "nprobe/efSearch", values,
                        set_both)  # fmt: skip


def build_ivf_pq(base: np.ndarray, args) -> Built:
    d, nlist = base.shape[1], _nlist(len(base), args)
    m = args.pq_m
    while d % m:
        m //= 2
    train = _train_sample(base, nlist, args)
    nbits = min(8, int(math.log2(max(2, len(train) // 4))))
    quantizer, kmeans_s = coarse_quantizer(base, train, nlist, args)
    r0, t = rss_bytes(), time.perf_counter() - kmeans_s
    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.train(train)  # the product quantizer only: the coarse centroids are shared
    index.add(base)
    build_s, rss = time.perf_counter() - t, (rss_bytes() - r0) / 2**20

    def set_nprobe(v: int) -> None:
        index.nprobe = v

    params = f"nlist={nlist} m={m}x{nbits}b train={len(train):,}"
    values = _nprobe_values(nlist, args)
    return _faiss_built("ivf_pq", params, index, build_s, rss, "nprobe", values, set_nprobe)


def _file_size(save: Callable[[str], None]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index")
        save(path)
        return os.path.getsize(path)


def build_annoy(base: np.ndarray, args) -> Built:
    import annoy

    r0, t = rss_bytes(), time.perf_counter()
    index = annoy.AnnoyIndex(base.shape[1], "angular")
    for i, v in enumerate(base):
        index.add_item(i, v)
    index.build(args.annoy_trees, n_jobs=args.threads)
    build_s, rss = time.perf_counter() - t, (rss_bytes() - r0) / 2**20
    nbytes = _file_size(index.save)
    state = {"search_k": -1}

    def set_k(v: int) -> None:
        state["search_k"] = v

    def one(q: np.ndarray):
        return index.get_nns_by_vector(q[0], K, search_k=state["search_k"])

    def batch(qs: np.ndarray) -> np.ndarray:  # Annoy has no batch call: a loop
        out = np.full((len(qs), K), -1, dtype=np.int64)
        for i, q in enumerate(qs):
            ids = index.get_nns_by_vector(q, K, search_k=state["search_k"])
            out[i, : len(ids)] = ids
        return out

    values = [args.annoy_trees * K * f for f in args.annoy_search_factors]
    return Built("annoy", f"trees={args.annoy_trees}", build_s, rss, nbytes, len(base),
                 "search_k", values, set_k, batch, one, index)  # fmt: skip


def build_hnswlib(base: np.ndarray, args) -> Built:
    import hnswlib

    r0, t = rss_bytes(), time.perf_counter()
    index = hnswlib.Index(space="ip", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=args.hnsw_m,
                     ef_construction=args.hnsw_ef_construction, random_seed=0)  # fmt: skip
    index.set_num_threads(args.threads)
    index.add_items(base, np.arange(len(base)))
    build_s, rss = time.perf_counter() - t, (rss_bytes() - r0) / 2**20
    nbytes = _file_size(index.save_index)

    def one(q: np.ndarray):
        return index.knn_query(q, k=K, num_threads=1)

    def batch(qs: np.ndarray) -> np.ndarray:
        return index.knn_query(qs, k=K, num_threads=args.threads)[0].astype(np.int64)

    params = f"M={args.hnsw_m} efC={args.hnsw_ef_construction}"
    return Built("hnswlib", params, build_s, rss, nbytes, len(base), "ef",
                 [max(v, K) for v in args.ef_values], index.set_ef, batch, one, index)  # fmt: skip


FAMILIES: dict[str, Callable[[np.ndarray, argparse.Namespace], Built]] = {
    "flat": build_flat,
    "hnsw": build_hnsw,
    "ivf_flat": build_ivf_flat,
    "ivf_hnsw": build_ivf_hnsw,
    "ivf_pq": build_ivf_pq,
    "annoy": build_annoy,
    "hnswlib": build_hnswlib,
}
OPTIONAL = {"annoy": "annoy", "hnswlib": "hnswlib"}


def available(name: str) -> bool:
    if name not in OPTIONAL:
        return True
    try:
        __import__(OPTIONAL[name])
    except ImportError:
        return False
    return True


# --- running ---------------------------------------------------------------------------------


def bench_dataset(name: str, base: np.ndarray, queries: np.ndarray, args) -> list[Row]:
    print(f"\n[{name}] exact ground truth for {len(queries):,} queries ...", flush=True)
    t = time.perf_counter()
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    truth = exact.search(queries, K)[1]
    del exact
    print(f"[{name}] ground truth in {time.perf_counter() - t:.1f} s", flush=True)
    rows: list[Row] = []
    for family in args.indexes:
        if not available(family):
            print(f"[{name}] {family}: not installed (pip install -e .[ann]); skipped")
            continue
        gc.collect()
        print(f"[{name}] building {family} on {len(base):,} vectors ...", flush=True)
        try:
            built = FAMILIES[family](base, args)
        except (RuntimeError, ValueError) as e:
            print(f"[{name}] {family}: cannot be built here ({str(e).splitlines()[0]}); skipped")
            continue
        print(f"[{name}] {family} built in {built.build_s:.1f} s ({built.params})", flush=True)
        for value in built.values:
            built.set_knob(value)
            faiss.omp_set_num_threads(args.query_threads)  # a lone query: one thread is fair
            times = single_query_times(built.search_one, queries, args.time_budget)
            faiss.omp_set_num_threads(args.threads)
            t = time.perf_counter()
            found = built.search_batch(queries)
            batch_us = (time.perf_counter() - t) / len(queries) * 1e6
            search = "-" if built.knob == "-" else f"{built.knob}={value}"
            row = Row(
                name, built.name, built.params, search, built.build_s,
                float(np.median(times) * 1e6), float(np.percentile(times, 99) * 1e6),
                batch_us, recall_at_k(np.asarray(found), truth), built.nbytes,
                built.rss_mb, built.ntotal,
            )  # fmt: skip
            rows.append(row)
            print(
                f"[{name}]   {family:8s} {search:16s} recall@{K} {row.recall:.3f}  "
                f"median {row.median_us:9.1f} us  p99 {row.p99_us:9.1f} us  "
                f"batch {row.batch_us:8.1f} us/q  ({len(times)} single queries)",
                flush=True,
            )
        del built
        gc.collect()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", help="an exported search bundle (its embeddings)")
    src.add_argument("--embeddings", help="a 2-D .npy array of embeddings")
    p.add_argument("--synthetic", type=int, default=1_000_000, help="synthetic base size (0: none)")
    p.add_argument("--dim", type=int, default=128, help="synthetic dimension")
    p.add_argument("--clusters", type=int, default=0, help="synthetic clusters (0: N/250, <= 4000)")
    p.add_argument("--intrinsic-dim", type=int, default=16, help="per-cluster subspace dimension")
    p.add_argument("--groups", type=int, default=50, help="groups of nearby clusters (0: none)")
    p.add_argument("--spread", type=float, default=1.0, help="cluster spread multiplier")
    p.add_argument("--queries", type=int, default=1000, help="queries (also the batch size)")
    p.add_argument("--out", default="experiments/bench-ann", help="folder for table and plots")
    p.add_argument("--threads", type=int, default=2, help="OpenMP / library threads")
    p.add_argument("--indexes", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--hnsw-ef-construction", type=int, default=40,
                   help="40 keeps the 1M build within minutes on 2 cores")  # fmt: skip
    p.add_argument("--ef-values", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4*sqrt(N))")
    p.add_argument("--nprobe-values", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    p.add_argument("--quantizer-m", type=int, default=32, help="ivf_hnsw: HNSW M of the quantizer")
    p.add_argument("--ivf-codec", choices=["Flat", "SQ8", "SQfp16"], default="Flat",
                   help="ivf_hnsw: how the lists store vectors (full floats or scalar-quantised)")
    p.add_argument("--quantizer-ef", type=int, nargs="+", default=[16, 32, 64],
                   help="ivf_hnsw: quantizer efSearch values, swept with each nprobe")
    p.add_argument("--query-threads", type=int, default=1,
                   help="threads for single-query timing (batch search uses --threads)")
    p.add_argument("--kmeans-iter", type=int, default=10)
    p.add_argument("--train-per-list", type=int, default=40, help="IVF training points per list")
    p.add_argument("--max-train", type=int, default=200_000)
    p.add_argument("--pq-m", type=int, default=16, help="PQ sub-quantizers (bytes per code)")
    p.add_argument("--annoy-trees", type=int, default=20)
    p.add_argument("--annoy-search-factors", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--time-budget", type=float, default=1.0,
                   help="seconds of single-query timing per setting (at least 100 queries)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = (
        f"faiss {faiss.__version__}, numpy {np.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {args.threads} threads, nice {os.nice(0)}, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    print(env)
    started = time.perf_counter()
    report = [f"# ANN benchmark\n\n{env}\n"]
    results = []
    for name, base, queries, desc in load_inputs(args):
        print(f"\n{desc}")
        rows = bench_dataset(name, base, queries, args)
        del base
        gc.collect()
        target, per_gb = target_line(rows), baseline_lines(rows) + per_gb_lines(rows)
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        plot(rows, desc, out / f"{slug}.png")
        md = table(rows)
        print(f"\n## {name}\n\n{desc}\n\n{md}\n{target}\n" + "\n".join(per_gb))
        report.append(f"## {name}\n\n{desc}\n\n{md}\n{target}\n\n" + "\n".join(
            f"- {line}" for line in per_gb) + f"\n\n![{name}]({slug}.png)\n")  # fmt: skip
        results.append({"dataset": name, "description": desc, "target": target,
                        "rows": [asdict(r) for r in rows]})  # fmt: skip
    total = time.perf_counter() - started
    footer = f"total {total:.0f} s; load average {os.getloadavg()[0]:.1f} at the end"
    report.append(footer + "\n")
    (out / "results.md").write_text("\n".join(report))
    (out / "results.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    print(f"\n{footer}\nwrote {out / 'results.md'}, results.json and plots")


if __name__ == "__main__":
    main()
