"""Re-ranking a result list with the gallery's own structure, after the index has answered.

Two published methods, both on a small set of unit vectors (a query and its top candidates at
search time, the held-out set in the evaluator), so their cost is bounded by the set, never by
the gallery:

- `k_reciprocal`: Zhong et al. 2017, "Re-ranking person re-identification with k-reciprocal
  encoding". Two items are close when they are in each other's k1 nearest neighbours (expanded
  by the k1/2-reciprocal sets of those neighbours); the Jaccard distance of those weighted
  neighbour sets, mixed with the original distance (lambda), ranks again.
- `alpha_qe`: alpha query expansion with database-side augmentation (Radenović et al.): every
  vector is replaced by the sum of its k nearest (itself included) weighted by similarity to
  the power alpha, then re-normalised; cosine on those vectors ranks again.

The gains published vary by data set (large on person re-identification, none on some product
data), so the evaluator measures both on the held-out images rather than assuming.
"""

from __future__ import annotations

import numpy as np

from mltrain.errors import ConfigError
from mltrain.inference.vectors import l2_normalize

RERANKERS = ("none", "k_reciprocal", "alpha_qe")


def _sq_dist(x: np.ndarray) -> np.ndarray:
    """Squared L2 distances of unit vectors, 2 - 2 cos, in [0, 4]."""
    return np.clip(2.0 - 2.0 * (x @ x.T), 0.0, 4.0).astype(np.float32)


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = rank[i, : k + 1]
    backward = rank[forward, : k + 1]
    return forward[np.flatnonzero((backward == i).any(axis=1))]


def k_reciprocal(x: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3) -> np.ndarray:
    """Re-ranked distances (n, n) among the rows of `x` (lower is closer)."""
    x = l2_normalize(x)
    n = len(x)
    k1, k2 = max(1, min(k1, n - 1)), max(1, min(k2, n))
    dist = _sq_dist(x)
    dist = dist / np.maximum(dist.max(axis=1, keepdims=True), 1e-12)  # per row, as the paper
    rank = np.argsort(dist, axis=1, kind="stable")
    v = np.zeros((n, n), dtype=np.float32)
    half = max(1, int(round(k1 / 2)))
    for i in range(n):
        base = _reciprocal(rank, i, k1)
        expanded = [base]
        for c in base:
            cand = _reciprocal(rank, int(c), half)
            if len(np.intersect1d(cand, base)) > 2 / 3 * len(cand):
                expanded.append(cand)
        idx = np.unique(np.concatenate(expanded))
        weight = np.exp(-dist[i, idx])
        v[i, idx] = weight / weight.sum()
    if k2 > 1:  # local query expansion of the encodings
        v = v[rank[:, :k2]].mean(axis=1)
    overlap = _overlap(v)
    jaccard = 1.0 - overlap / (2.0 - overlap)
    return (1 - lam) * jaccard + lam * dist


def _overlap(v: np.ndarray) -> np.ndarray:
    """sum_j min(v[a, j], v[b, j]) for every pair of rows, through the few non-zero columns
    of each row (the paper's inverted index): O(n * nnz), never an n x n x n array."""
    overlap = np.zeros((len(v), len(v)), dtype=np.float32)
    holders = [np.flatnonzero(col) for col in v.T]  # rows with weight in each column
    for a in range(len(v)):
        for j in np.flatnonzero(v[a]):
            rows = holders[j]
            overlap[a, rows] += np.minimum(v[a, j], v[rows, j])
    return overlap


def alpha_qe(x: np.ndarray, k: int = 3, alpha: float = 3.0) -> np.ndarray:
    """Each row replaced by its similarity^alpha-weighted k nearest (itself included), unit
    length again: database-side augmentation for every row, query expansion for a query row."""
    x = l2_normalize(x)
    k = max(1, min(k, len(x)))
    sim = x @ x.T
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(np.clip(sim, 0.0, None), top, axis=1) ** alpha
    return l2_normalize(np.einsum("nk,nkd->nd", w, x[top]))


def reranked_order(x: np.ndarray, method: str, **args: float) -> np.ndarray:
    """For every row of `x`, the other rows from closest to farthest after re-ranking."""
    if method not in RERANKERS:
        raise ConfigError(f"unknown re-ranker {method!r}; valid: {', '.join(RERANKERS)}")
    if method == "k_reciprocal":
        dist = k_reciprocal(x, **args)
    else:
        y = alpha_qe(x, **args) if method == "alpha_qe" else l2_normalize(x)
        dist = -(y @ y.T)
    np.fill_diagonal(dist, np.inf)  # a row never retrieves itself
    return np.argsort(dist, axis=1, kind="stable")[:, :-1]


def rerank_candidates(query: np.ndarray, candidates: np.ndarray, method: str) -> np.ndarray:
    """New order of `candidates` (rows, the index's top-k for `query`): positions into them."""
    if method == "none":
        return np.arange(len(candidates))
    x = np.concatenate([np.asarray(query, np.float32)[None, :], candidates]).astype(np.float32)
    return reranked_order(x, method)[0] - 1  # row 0 is the query; candidates start at 1
