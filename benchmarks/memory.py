"""Peak memory and time of retrieval metrics on large random clustered embeddings.

    python benchmarks/memory.py [--n 1000000] [--dim 128] [--queries 10000] [--loo auto]

Evaluates `mltrain.evaluation.metrics.retrieval_metrics` with ks=(1, 5, 10) and max_k=100 (so
the exact search returns 100 neighbours per query, 101 in leave-one-out) on N x dim float32
embeddings
drawn around N/100 random class centres. Each measurement runs in its own subprocess so the
figures are clean: RSS before the call (imports + embeddings), the peak during it (the kernel's
high-water mark, reset just before the call) and RSS after it (results still held).

Two measurements:
- queries: `--queries` separate query vectors against the N-vector gallery (`gallery_emb=`),
  the memory of indexing the full gallery with a bounded search;
- leave-one-out: all N vectors query each other, run when `--loo yes`, or with `--loo auto`
  when its time, extrapolated from the first measurement (time scales with the number of
  queries), fits in `--budget` seconds; otherwise the estimate is printed instead.

    python benchmarks/memory.py --shards [--n 1000000] [--dim 128] [--shard-size 100000]
                                [--index flat,ivf_pq] [--nlist 1024]

`--shards` measures a sharded export instead (`mltrain.retrieval.shards`, what `export.shard_size`
turns on): writing the N x dim gallery into memory-mapped shards batch by batch, then, per
index type, building the cosine index (a) from the gallery loaded into one array, as an
export below `export.shard_size` does, and (b) from the shards (trained on an even sample,
added shard by shard). Each in a fresh subprocess; the shards live in a temporary folder
(`--tmp`, N x dim x 4 bytes of disk) removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KS = (1, 5, 10)
MAX_K = 100
CLASS_SIZE = 100  # images per class on average: R ~ 100 = max_k
NOISE = 1.6  # per-dimension spread around a unit-normal centre: precision@1 well below 1


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def clustered_chunks(n: int, dim: int, classes: int, seed: int, chunk: int = 65536):
    """The rows of `clustered` (the same numbers), yielded as (rows, labels) chunk by chunk,
    for writers that never hold the whole gallery."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((classes, dim), dtype=np.float32)
    labels = rng.integers(0, classes, size=n)
    for start in range(0, n, chunk):
        part = labels[start : start + chunk]
        noise = rng.standard_normal((len(part), dim), dtype=np.float32)
        yield centres[part] + NOISE * noise, part


def clustered(n: int, dim: int, classes: int, seed: int, chunk: int = 65536):
    """(n x dim float32, labels) around `classes` Gaussian centres, made in place chunk by
    chunk so no temporary larger than a chunk exists."""
    emb = np.empty((n, dim), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    start = 0
    for rows, part in clustered_chunks(n, dim, classes, seed, chunk):
        emb[start : start + len(rows)] = rows
        labels[start : start + len(rows)] = part
        start += len(rows)
    return emb, labels


def child(mode: str, n: int, dim: int, queries: int, seed: int) -> dict:
    """One measurement, in this (fresh) process."""
    from mltrain.evaluation.metrics import retrieval_metrics

    classes = max(2, n // CLASS_SIZE)
    rss_imports = _rss_mib()
    emb, labels = clustered(n, dim, classes, seed)
    kwargs = {}
    q_emb, q_labels = emb, labels
    if mode == "queries":
        q_emb, q_labels = clustered(queries, dim, classes, seed + 1)
        kwargs = {"gallery_emb": emb, "gallery_labels": labels}
    rss_before = _rss_mib()
    reset = _reset_peak()
    start = time.perf_counter()
    metrics, neighbours = retrieval_metrics(q_emb, q_labels, ks=KS, max_k=MAX_K, **kwargs)
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    rss_after = _rss_mib()
    return {
        "mode": mode, "n": n, "dim": dim, "queries": len(q_emb), "classes": classes,
        "emb_mib": (emb.nbytes + (q_emb.nbytes if mode == "queries" else 0)) / 2**20,
        "rss_imports": rss_imports, "rss_before": rss_before, "peak": peak,
        "rss_after": rss_after, "peak_was_reset": reset, "seconds": seconds,
        "precision_at_1": metrics["precision_at_1"], "search_k": metrics["search_k"],
        "threads": os.cpu_count(),
    }


def measure(mode: str, n: int, dim: int, queries: int, seed: int) -> dict:
    """Run `child` in a subprocess and return its figures."""
    return _run_child(mode, ["--child", mode, "--n", str(n), "--dim", str(dim),
                             "--queries", str(queries), "--seed", str(seed)])  # fmt: skip


def _run_child(what: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- sharded export: writing shards, and building an index from them or from one array ----


def index_args(kind: str, nlist: int, dim: int) -> dict:
    """Benchmark index settings: IVF with `nlist` lists; PQ with up to 16 sub-quantizers."""
    if kind == "ivf_pq":
        return {"nlist": nlist, "m": max(m for m in range(1, 17) if dim % m == 0)}
    return {"nlist": nlist} if kind == "ivf_flat" else {}


def shard_child(mode: str, folder: str, n: int, dim: int, shard_size: int, kind: str,
                nlist: int, seed: int) -> dict:
    """One sharded-export measurement in this (fresh) process: `write` the gallery into
    shards, or build a `kind` index from one `array` or from the `shards`."""
    from mltrain.retrieval.index import index_nbytes
    from mltrain.retrieval.index_types import build_index
    from mltrain.retrieval.shards import ShardReader, ShardWriter, index_from_shards

    rss_imports = _rss_mib()
    out = {"mode": mode, "kind": kind, "n": n, "dim": dim, "shard_size": shard_size,
           "emb_mib": n * dim * 4 / 2**20, "rss_imports": rss_imports}  # fmt: skip
    if mode == "write":
        reset = _reset_peak()
        start = time.perf_counter()
        writer = ShardWriter(folder, n, shard_size)
        for rows, _ in clustered_chunks(n, dim, max(2, n // CLASS_SIZE), seed, chunk=4096):
            writer.write(rows)
        out["shards"] = len(writer.close())
        index = None
    else:
        reader = ShardReader(sorted(Path(folder).glob("embeddings-*.npy")))
        args = index_args(kind, nlist, dim)
        reset = _reset_peak()
        start = time.perf_counter()
        if mode == "array":  # what an export below export.shard_size does
            emb = np.asarray(reader)
            index = build_index(kind, emb, "cosine", None, args)
        else:
            index = index_from_shards(kind, reader, "cosine", None, args)
    out["seconds"] = time.perf_counter() - start
    out["peak"] = _peak_mib()
    out["rss_after"] = _rss_mib()
    out["peak_was_reset"] = reset
    out["index_mib"] = index_nbytes(index) / 2**20 if index is not None else float("nan")
    return out


def shard_main(args: argparse.Namespace, common) -> list[dict]:
    kinds = [k.strip() for k in args.index.split(",") if k.strip()]
    from mltrain.retrieval.index_types import default_nlist

    nlist = args.nlist or min(1024, default_nlist(args.n))
    print(f"# memory benchmark: sharded export of {args.n:,} x {args.dim} float32 clustered "
          f"embeddings ({args.n * args.dim * 4 / 2**20:,.0f} MiB) in shards of "
          f"{args.shard_size:,} rows; cosine indexes {', '.join(kinds)} (IVF nlist {nlist}); "
          "each row measured in a fresh subprocess")
    print(common.load_note())
    wall = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="mltrain-shards-", dir=args.tmp) as folder:
        def run(mode: str, kind: str = "-") -> dict:
            return _run_child(f"shards {mode} {kind}", [
                "--shard-child", mode, "--dir", folder, "--n", str(args.n), "--dim",
                str(args.dim), "--shard-size", str(args.shard_size), "--index", kind,
                "--nlist", str(nlist), "--seed", str(args.seed)])  # fmt: skip

        results.append(run("write"))
        for kind in kinds:
            results += [run("array", kind), run("shards", kind)]
    rows, baseline = [], {}
    for r in results:
        grew = r["peak"] - r["rss_imports"]
        if r["mode"] == "write":
            what = f"write {r['n']:,} rows into {r['shards']} shards"
        elif r["mode"] == "array":
            what, baseline[r["kind"]] = f"{r['kind']} index from one array", grew
        else:
            what = f"{r['kind']} index from shards of {r['shard_size']:,}"
        ratio = grew / baseline[r["kind"]] if r["mode"] == "shards" else float("nan")
        rows.append([what, r["emb_mib"], r["rss_imports"], r["peak"], grew, ratio,
                     r["index_mib"], r["seconds"]])  # fmt: skip
    print()
    print(common.markdown_table([
        "build", "gallery MiB", "RSS before MiB", "peak RSS MiB", "peak - before MiB",
        "vs one array", "index MiB", "seconds",
    ], rows))
    since = ("reset just before the work" if results[0]["peak_was_reset"]
             else "since process start (reset refused)")
    print(f"RSS before = after imports; peak = VmHWM {since}, memory-mapped shard pages "
          "included; 'vs one array' = (peak - before) from shards / from one array")
    print(f"total {time.perf_counter() - wall:.0f} s; {common.load_note()}")
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery embeddings")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=10_000,
                        help="separate queries searched against the N gallery")
    parser.add_argument("--loo", choices=("auto", "yes", "no"), default="auto",
                        help="also run full leave-one-out over all N (auto: if it fits)")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds the leave-one-out run may take under --loo auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", action="store_true",
                        help="measure a sharded export instead (see the module docstring)")
    parser.add_argument("--shard-size", type=int, default=100_000, help="rows per shard")
    parser.add_argument("--index", default="flat,ivf_pq",
                        help="with --shards: comma-separated index types to build")
    parser.add_argument("--nlist", type=int, default=None,
                        help="with --shards: IVF lists (default min(1024, 4 sqrt(n)))")
    parser.add_argument("--tmp", default=None, help="with --shards: folder for the shards")
    parser.add_argument("--child", choices=("queries", "loo"), help=argparse.SUPPRESS)
    parser.add_argument("--shard-child", choices=("write", "array", "shards"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.dim, args.queries, args.seed)))
        return []
    if args.shard_child:
        print(json.dumps(shard_child(args.shard_child, args.dir, args.n, args.dim,
                                     args.shard_size, args.index, args.nlist, args.seed)))
        return []

    try:  # imported here: the measuring child must not load torch through common
        from benchmarks import common
    except ImportError:
        import common  # type: ignore[no-redef]

    if args.shards:
        return shard_main(args, common)
    print(f"# memory benchmark: retrieval_metrics(ks={KS}, max_k={MAX_K}, metric=cosine) on "
          f"{args.n:,} x {args.dim} float32 clustered embeddings (~{CLASS_SIZE} per class); "
          "each row measured in a fresh subprocess")
    print(common.load_note())
    wall = time.perf_counter()
    queries = min(args.queries, args.n)
    results = [measure("queries", args.n, args.dim, queries, args.seed)]
    estimate = results[0]["seconds"] * args.n / queries
    run_loo = args.loo == "yes" or (args.loo == "auto" and estimate <= args.budget)
    if run_loo:
        results.append(measure("loo", args.n, args.dim, queries, args.seed))
    rows = []
    for r in results:
        what = (f"{r['queries']:,} queries vs {r['n']:,} gallery" if r["mode"] == "queries"
                else f"leave-one-out, all {r['n']:,}")
        rows.append([
            what, r["emb_mib"], r["rss_before"], r["peak"], r["rss_after"],
            r["peak"] - r["rss_before"], (r["peak"] - r["rss_before"]) / r["emb_mib"],
            r["seconds"], r["precision_at_1"],
        ])
    print()
    print(common.markdown_table([
        "evaluation", "embeddings MiB", "RSS before MiB", "peak RSS MiB", "RSS after MiB",
        "peak - before MiB", "(peak - before) / embeddings", "seconds", "precision@1",
    ], rows))
    r0 = results[0]
    since = ("reset just before the call" if r0["peak_was_reset"]
             else "since process start (reset refused)")
    print(f"RSS before = after imports ({r0['rss_imports']:.0f} MiB) plus the embeddings "
          f"and labels; peak = VmHWM {since}; search k = {r0['search_k']} "
          "(+1 in leave-one-out)")
    if not run_loo:
        print(f"leave-one-out over all {args.n:,} not run: about {estimate:.0f} s estimated "
              f"({args.n:,} / {queries:,} x the query run), over the {args.budget:.0f} s budget "
              "(--loo yes forces it)")
    print(f"total {time.perf_counter() - wall:.0f} s; {common.load_note()}")
    return results


if __name__ == "__main__":
    main()
