"""Does re-ranking help on this data? Leave-one-out retrieval on the held-out embeddings with
and without each re-ranker (`mltrain.retrieval.rerank`), with its cost per query, so a
re-ranker is recommended only where these images show a gain larger than their noise."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mltrain.evaluation.metrics import num_relevant, per_query_scores
from mltrain.retrieval.rerank import RERANKERS, reranked_order

MAX_ROWS = 2000  # k-reciprocal holds a few n x n arrays: 2,000 rows is ~100 MB and seconds
MIN_GAIN = 0.005  # half a point of MAP@R, the smallest gain worth a slower search
NOISE_SE = 2.0  # and at least this many standard errors of the per-query gain


def rerank_comparison(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """{method: {precision_at_1, map_at_r, ms_per_query}} on at most MAX_ROWS seeded rows,
    plus `rows` and `recommended`: the best method by MAP@R among those that gain clearly on
    it and lose nothing clear at precision@1 (a bundle's one-line answer is its top hit, so
    a re-ranker that trades the first hit for the later ones is not a default), else none."""
    rows = np.arange(len(emb))
    if len(rows) > MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(emb), MAX_ROWS, replace=False))
    x, lab = np.asarray(emb, np.float32)[rows], np.asarray(labels)[rows]
    relevant = num_relevant(lab, lab, leave_one_out=True)
    scored = relevant > 0
    out: dict[str, Any] = {}
    per_query: dict[str, np.ndarray] = {}
    first: dict[str, np.ndarray] = {}  # per-query precision@1
    for method in RERANKERS:
        start = time.perf_counter()
        order = reranked_order(x, method)
        seconds = time.perf_counter() - start
        k = int(min(order.shape[1], max(10, relevant.max())))
        hits = lab[order[:, :k]] == lab[:, None]
        scores = per_query_scores(hits[scored], relevant[scored], (1,), k)
        per_query[method], first[method] = scores["map_at_r"], scores["precision_at_1"]
        out[method] = {
            "precision_at_1": float(scores["precision_at_1"].mean()),
            "map_at_r": float(scores["map_at_r"].mean()),
            "ms_per_query": seconds / len(x) * 1e3,
        }
    good = [m for m in RERANKERS if m != "none"
            and _clear_gain(per_query[m], per_query["none"])
            and not _clear_gain(first["none"], first[m], min_gain=0.0)]  # fmt: skip
    out["rows"] = len(x)
    out["recommended"] = max(good, key=lambda m: out[m]["map_at_r"]) if good else "none"
    return out


def _clear_gain(new: np.ndarray, old: np.ndarray, min_gain: float = MIN_GAIN) -> bool:
    """A mean per-query gain of `min_gain` or more that also stands NOISE_SE standard errors
    clear of zero: on 36 queries one query is worth nearly 3 points, and a lucky few are no
    reason to re-rank every search. (Swapped, it asks whether `old` is clearly better.)"""
    diff = new - old
    gain = float(diff.mean()) if len(diff) else 0.0
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else np.inf
    return gain >= min_gain and gain > 0 and gain >= NOISE_SE * se
