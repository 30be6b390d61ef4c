"""Index-backed evaluation sweeps: how short can the embedding be, and which index to ship.

Both sweeps report per-query latency as the *median of single-query searches* (one query per
`index.search` call, after one warm-up call, on up to `TIMING_QUERIES` queries spread over the
query set). That is what an online lookup pays; batch time / n would hide per-call overhead.
Latency uses whatever number of threads Faiss is set to; compare rows of one run only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np

from mltrain.errors import ConfigError, DataError
from mltrain.evaluation.metrics import (
    book_accuracy,
    check_labelled,
    num_relevant,
    retrieval_metrics,
    score_neighbours,
)
from mltrain.retrieval.index import (
    drop_self,
    exact_index,
    faiss_metric,
    index_nbytes,
    prepare,
    search_chunks,
    timed_single_queries,
)
from mltrain.retrieval.index_types import (
    INDEX_TYPES,
    apply_transforms,
    build_index,
    pca_transforms,
    shorter_pca,
    with_transforms,
)

TIMING_QUERIES = 200
TIMING_K = 10


def single_query_us(
    index: faiss.Index, queries: np.ndarray, metric: str = "cosine", k: int = TIMING_K
) -> float:
    """Median microseconds of one-query searches (normalisation for cosine is not timed)."""
    pick = np.unique(
        np.linspace(0, len(queries) - 1, min(TIMING_QUERIES, len(queries))).astype(int)
    )
    q = prepare(queries[pick], metric, "queries")
    k = min(k, index.ntotal)
    times = np.array([s for s, _ in timed_single_queries(lambda x: index.search(x, k), q)])
    return float(np.median(times) * 1e6)


def _lengths(lengths: Sequence[int], dim: int) -> list[int]:
    bad = [n for n in lengths if not isinstance(n, (int, np.integer)) or n < 1]
    if bad:
        raise ConfigError(f"PCA lengths must be positive integers, got {bad}")
    return sorted({int(n) for n in lengths if n <= dim} | {dim})


def pca_sweep(
    train_emb: np.ndarray,
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    lengths: Sequence[int],
    metric: str = "cosine",
    gallery_emb: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Retrieval quality, latency and size per PCA length, shortest first.

    PCA is fitted on `train_emb` only, so the evaluation set never leaks into the projection.
    Lengths above the embedding dimension are skipped; the full length is always included and
    is the untransformed embedding (`"pca": False`), i.e. the baseline a shorter length must
    match. Without a gallery, retrieval is leave-one-out within the queries. book_accuracy is
    the book's L2 protocol on the transformed query set (for cosine the transformed vectors
    are unit length, so it ranks like cosine). query_us and index_bytes are for a Flat index
    over the gallery that holds the PCA inside it (raw embeddings in, as deployed).

    Row keys: length, pca, precision_at_1, map_at_r, book_accuracy, query_us, index_bytes.
    """
    train = prepare(train_emb, metric, "train embeddings")
    query = prepare(query_emb, metric, "query embeddings")
    gallery = None if gallery_emb is None else prepare(gallery_emb, metric, "gallery embeddings")
    dims = {x.shape[1] for x in (train, query, gallery) if x is not None}
    if len(dims) != 1:
        raise DataError(f"train, query and gallery embeddings differ in dimension: {sorted(dims)}")
    dim = dims.pop()
    base = query if gallery is None else gallery
    rows = []
    reduced = [n for n in _lengths(lengths, dim) if n != dim]
    longest = pca_transforms(train, max(reduced), metric) if reduced else []
    for length in _lengths(lengths, dim):
        chain = [] if length == dim else shorter_pca(longest, length, metric)
        q = apply_transforms(chain, query)
        g = None if gallery is None else apply_transforms(chain, gallery)
        scores, _ = retrieval_metrics(q, query_labels, g, gallery_labels, metric, ks=(1,))
        index = with_transforms(exact_index(length, faiss_metric(metric)), chain)
        index.add(base)
        rows.append(
            {
                "length": length,
                "pca": bool(chain),
                "precision_at_1": scores["precision_at_1"],
                "map_at_r": scores["map_at_r"],
                "book_accuracy": book_accuracy(q, query_labels),
                "query_us": single_query_us(index, query_emb, metric),
                "index_bytes": index_nbytes(index),
            }
        )
    return rows


def shortest_within(
    rows: Sequence[Mapping[str, Any]], key: str = "precision_at_1", tolerance: float = 0.005
) -> Mapping[str, Any]:
    """The shortest-length row whose `key` is at most `tolerance` below the full-length row's."""
    if not rows:
        raise DataError("no PCA sweep rows to choose from")
    full = max(rows, key=lambda r: r["length"])
    ok = [r for r in rows if r[key] >= full[key] - tolerance]
    return min(ok, key=lambda r: r["length"])


def index_comparison(
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    kinds: Sequence[str] = ("flat", "hnsw", "ivf_flat", "ivf_pq"),
    metric: str = "cosine",
    same_set: bool = True,
    args: Mapping[str, Mapping[str, Any]] | None = None,
    max_k: int = 1000,
) -> list[dict[str, Any]]:
    """Quality, build time, latency and size of each index type, measured through the index.

    `same_set=True` means the queries are the gallery rows (leave-one-out: a query's own row
    is dropped from its results). `args` maps an index kind to its builder args (see
    `mltrain.retrieval.index_types.INDEX_TYPES`). Search k is min(max_k, largest R), so map_at_r is
    exact up to max_k; an approximate index returning fewer items simply scores lower.

    Row keys: kind, precision_at_1, map_at_r, build_seconds, query_us, bytes.
    """
    unknown = [k for k in kinds if k not in INDEX_TYPES]
    if unknown:
        raise ConfigError(
            f"unknown index type(s) {unknown}; valid names: {', '.join(INDEX_TYPES.names())}"
        )
    gallery_emb, gallery_labels = check_labelled(gallery_emb, gallery_labels, "gallery embeddings")
    query_emb, query_labels = check_labelled(query_emb, query_labels, "query embeddings", 1)
    if same_set and len(query_emb) != len(gallery_emb):
        raise DataError(
            f"same_set=True needs the queries to be the gallery rows, got {len(query_emb)} "
            f"queries and {len(gallery_emb)} gallery rows"
        )
    relevant = num_relevant(query_labels, gallery_labels, leave_one_out=same_set)
    if not (relevant > 0).any():
        raise DataError("no query has another item of its class in the gallery")
    available = len(gallery_emb) - int(same_set)
    k = max(1, min(available, max_k, int(relevant.max())))
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        index = build_index(kind, gallery_emb, metric, args=(args or {}).get(kind))
        build_seconds = time.perf_counter() - t0
        chunks = search_chunks(index, query_emb, k + int(same_set), metric)
        if same_set:
            chunks = ((s, *drop_self(d, i, s)) for s, d, i in chunks)
        scores, _ = score_neighbours(chunks, query_labels, gallery_labels, relevant)
        rows.append(
            {
                "kind": kind,
                "precision_at_1": scores["precision_at_1"],
                "map_at_r": scores["map_at_r"],
                "build_seconds": build_seconds,
                "query_us": single_query_us(index, query_emb, metric),
                "bytes": index_nbytes(index),
            }
        )
    return rows
