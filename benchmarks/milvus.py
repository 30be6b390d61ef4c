"""Milvus Lite against Faiss IVF-Flat, both through mltrain's gallery interface, in one process.

  python benchmarks/milvus.py                    # 100,000 x 128 clustered vectors
  python benchmarks/milvus.py --n 20000 --queries 100

The vectors are `benchmarks/ann.py`'s synthetic clustered set (unit length, cosine). Each
backend is built as `export` builds it (`mltrain.retrieval.gallery.build_gallery`: Faiss
trains and adds in memory; Milvus Lite inserts into a fresh `gallery.db` folder in batches of
1,000), then searched one query per call as `search` and `serve` do. Reported per backend:
insert throughput (vectors per second, Faiss's training included), median and p99
single-query latency, recall@10 against exact search, and each as a ratio to Faiss IVF-Flat.
Needs `pip install -e '.[milvus]'`. Timings are wall-clock on whatever else runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ann import clustered  # noqa: E402
from mltrain.retrieval.gallery import build_gallery  # noqa: E402
from mltrain.retrieval.index import knn, timed_single_queries  # noqa: E402

K = 10


def run(name: str, kind: str, args: dict, base: np.ndarray, queries: np.ndarray,
        truth: np.ndarray, folder: Path) -> dict:  # fmt: skip
    """Build one gallery of `base`, then time single queries and score their recall@10."""
    labels, paths = np.zeros(len(base), np.int64), [""] * len(base)
    (folder / name).mkdir()
    t0 = time.perf_counter()
    gallery = build_gallery(kind, args, None, "cosine", base, labels, paths, folder / name,
                            folder / name)  # fmt: skip
    build_s = time.perf_counter() - t0
    if getattr(gallery, "client", "absent") is None:  # a Lite gallery closes once built
        gallery = _reopen(gallery, folder / name, len(base))
    times, found = [], []
    for seconds, (_, rows) in timed_single_queries(lambda q: gallery.search(q, K), queries):
        times.append(seconds * 1e6)
        found.append(rows[0])
    gallery.close()
    hits = [len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth, strict=True)]
    return {"name": name, "insert_per_s": len(base) / build_s, "build_s": build_s,
            "median_us": float(np.median(times)), "p99_us": float(np.percentile(times, 99)),
            "recall": float(np.sum(hits) / (K * len(truth)))}  # fmt: skip


def _reopen(gallery, folder: Path, count: int):
    from mltrain.retrieval.milvus import MilvusGallery

    manifest = {"index": gallery.describe(folder), "metric": "cosine", "count": count,
                "embedding_dim": gallery.dim}  # fmt: skip
    return MilvusGallery.open(folder, manifest, [])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nprobe", type=int, default=16)
    a = p.parse_args(argv)
    base, queries, desc = clustered(a.n, a.dim, a.queries, min(4000, max(1, a.n // 250)), 16,
                                    groups=50)  # fmt: skip
    truth = knn(queries, base, K)[1]
    print(desc)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows.append(run("faiss ivf_flat", "ivf_flat", {"nprobe": a.nprobe}, base, queries,
                        truth, folder))  # fmt: skip
        rows.append(run("faiss flat", "flat", {}, base, queries, truth, folder))
        for index_type in ("FLAT", "IVF_FLAT"):
            rows.append(run(f"milvus lite {index_type}", "milvus", {"index_type": index_type},
                            base, queries, truth, folder))  # fmt: skip
    ref = rows[0]
    print(f"\n{a.n:,} x {a.dim} vectors, {a.queries} single queries, k={K}; ratios are to "
          "faiss ivf_flat\n")
    print("| gallery | insert vec/s | x | median µs/query | x | p99 µs | recall@10 | x |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = {key: r[key] / ref[key] for key in ("insert_per_s", "median_us", "recall")}
        print(f"| {r['name']} | {r['insert_per_s']:,.0f} | {ratio['insert_per_s']:.3g}"
              f" | {r['median_us']:,.0f} | {ratio['median_us']:.3g} | {r['p99_us']:,.0f}"
              f" | {r['recall']:.3f} | {ratio['recall']:.3g} |")


if __name__ == "__main__":
    main()
