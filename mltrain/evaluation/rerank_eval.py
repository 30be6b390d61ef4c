"""Does re-ranking help on this data? Leave-one-out retrieval on the held-out embeddings with
and without each re-ranker (`mltrain.retrieval.rerank`), with its cost per query, so a
re-ranker is recommended only where these images show a gain."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mltrain.evaluation.metrics import num_relevant, score_neighbours
from mltrain.retrieval.rerank import RERANKERS, reranked_order

MAX_ROWS = 2000  # k-reciprocal holds a few n x n arrays: 2,000 rows is ~100 MB and seconds
MIN_GAIN = 0.005  # half a point of MAP@R, the smallest gain worth a slower search


def rerank_comparison(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """{method: {precision_at_1, map_at_r, ms_per_query}} on at most MAX_ROWS seeded rows,
    plus `rows` and `recommended` (the best method by MAP@R if it gains MIN_GAIN, else none)."""
    rows = np.arange(len(emb))
    if len(rows) > MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(emb), MAX_ROWS, replace=False))
    x, lab = np.asarray(emb, np.float32)[rows], np.asarray(labels)[rows]
    relevant = num_relevant(lab, lab, leave_one_out=True)
    out: dict[str, Any] = {}
    for method in RERANKERS:
        start = time.perf_counter()
        order = reranked_order(x, method)
        seconds = time.perf_counter() - start
        k = int(min(order.shape[1], max(10, relevant.max())))
        chunk = (0, np.zeros((len(x), k), np.float32), order[:, :k])
        scores, _ = score_neighbours([chunk], lab, lab, relevant, ks=(1,), r_k=k)
        out[method] = {
            "precision_at_1": scores["precision_at_1"],
            "map_at_r": scores["map_at_r"],
            "ms_per_query": seconds / len(x) * 1e3,
        }
    best = max(RERANKERS, key=lambda m: out[m]["map_at_r"])
    gain = out[best]["map_at_r"] - out["none"]["map_at_r"]
    out["rows"] = len(x)
    out["recommended"] = best if best != "none" and gain >= MIN_GAIN else "none"
    return out
