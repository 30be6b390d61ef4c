"""Retrieval metrics on embeddings, and their per-class views.

Retrieval definitions follow pytorch-metric-learning's `AccuracyCalculator` so numbers are
comparable with papers that use it:

- precision_at_k: mean share of correct items among the top k.
- recall_at_k: share of queries with at least one correct item in the top k (the "Recall@K"
  of the metric-learning literature, not the IR recall).
- r_precision: precision among the top R, where R is the number of gallery items of the
  query's class (the query itself excluded in leave-one-out).
- map_at_r: average precision over the top R, divided by R (unretrieved relevant items count
  as misses).
- mean_average_precision: average precision over the first R_max results (R_max: the largest
  R of any query), divided by R; MAP@R and it coincide when every query has the same R.

Queries whose class has no other item in the gallery ("lone" queries) cannot be scored and are
left out of every retrieval average, as pytorch-metric-learning does.

All k-NN searches go through `mltrain.retrieval.index` (Faiss); nothing here builds an N x N matrix.
Verification (ROC on pairs) and one-shot figures are in `mltrain.evaluation.verification`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mltrain.errors import ConfigError, DataError
from mltrain.retrieval.index import as_vectors, check_metric, knn_chunks
from mltrain.retrieval.pairs import plain as _plain

# Neighbour columns `per_class_metrics` needs (precision_at_5).
PER_CLASS_K = 5

ClassNames = Sequence[str] | Mapping[Any, str] | None


@dataclass(frozen=True)
class Neighbours:
    """Top neighbours kept by `retrieval_metrics`, so per-class figures need no second search.

    indices, scores and labels are (n_queries, n_kept), best first: gallery row numbers, search
    scores (see `mltrain.retrieval.index`) and gallery labels. `scored` marks the queries that
    count in the metrics (their class has at least one other gallery item); filter with it before
    calling `per_class_metrics` or `confused_pairs` to describe the same queries.
    """

    indices: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    query_labels: np.ndarray
    scored: np.ndarray


# --- validation ---------------------------------------------------------------------------


def check_labelled(
    emb: np.ndarray, labels: np.ndarray, name: str = "embeddings", min_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 embeddings and 1-D labels of the same, non-zero length, with enough classes."""
    labels = np.asarray(labels)
    if np.size(emb) == 0 or labels.size == 0:
        raise DataError(f"{name} are empty; evaluate on a split that has images")
    emb = as_vectors(emb, name)
    if labels.ndim != 1:
        raise DataError(f"{name} labels must be 1-D (one label per row), got shape {labels.shape}")
    if len(emb) != len(labels):
        raise DataError(
            f"{name}: {len(emb)} embeddings but {len(labels)} labels; pass one label per row"
        )
    classes = np.unique(labels)
    if len(classes) < min_classes:
        raise DataError(
            f"{name} labels have a single class ({_plain(classes[0])!r}); these metrics need "
            f"at least {min_classes} classes, so evaluate on a split with more classes"
        )
    return emb, labels


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ConfigError(f"ks must be positive integers, got {ks!r}")
    return ks


def _hits(nn_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """(n_queries, k) bool: is the j-th neighbour of query i of the query's class."""
    nn_labels, query_labels = np.asarray(nn_labels), np.asarray(query_labels)
    if nn_labels.ndim != 2 or nn_labels.shape[0] != len(query_labels) or nn_labels.size == 0:
        raise DataError(
            f"nn_labels must be (n_queries, k) with n_queries={len(query_labels)}, "
            f"got shape {nn_labels.shape}"
        )
    return nn_labels == query_labels[:, None]


def _check_width(k: int, width: int) -> None:
    if not 1 <= k <= width:
        raise ConfigError(f"k={k} but only {width} neighbours per query were retrieved")


def _relevant(num_relevant: np.ndarray | int, n: int) -> np.ndarray:
    r = np.broadcast_to(np.asarray(num_relevant, dtype=np.int64), (n,))
    if not (r > 0).any():
        raise DataError("no query has a relevant gallery item (num_relevant is 0 everywhere)")
    return r


# --- per-query scores (pml definitions) ---------------------------------------------------


def _pq_precision(hits: np.ndarray, k: int) -> np.ndarray:
    return hits[:, :k].sum(axis=1) / k


def _pq_recall(hits: np.ndarray, k: int) -> np.ndarray:
    return hits[:, :k].any(axis=1).astype(np.float64)


def _within_r(hits: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.arange(hits.shape[1])[None, :] < r[:, None]


def _pq_r_precision(hits: np.ndarray, r: np.ndarray) -> np.ndarray:
    # With fewer than R columns retrieved this is precision over what was retrieved (as pml).
    denom = np.maximum(np.minimum(r, hits.shape[1]), 1)
    return (hits & _within_r(hits, r)).sum(axis=1) / denom


def _pq_average_precision(hits: np.ndarray, r: np.ndarray, at_r: bool) -> np.ndarray:
    rel = hits & _within_r(hits, r) if at_r else hits
    precision_at_hit = np.cumsum(rel, axis=1) * rel / np.arange(1, hits.shape[1] + 1)
    return precision_at_hit.sum(axis=1) / np.maximum(r, 1)


def per_query_scores(
    hits: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int] = (1,), r_k: int | None = None
) -> dict[str, np.ndarray]:
    """Every retrieval metric per query from a hit matrix; averages are left to the caller.

    The R-based metrics use only the first `r_k` columns (default: all), so that extra columns
    searched for large ks do not change mean_average_precision.
    """
    out = {}
    for k in ks:
        out[f"precision_at_{k}"] = _pq_precision(hits, k)
        out[f"recall_at_{k}"] = _pq_recall(hits, k)
    r_hits = hits[:, :r_k]
    out["r_precision"] = _pq_r_precision(r_hits, num_relevant)
    out["map_at_r"] = _pq_average_precision(r_hits, num_relevant, at_r=True)
    out["mean_average_precision"] = _pq_average_precision(r_hits, num_relevant, at_r=False)
    return out


# --- low-level metrics on a neighbour-label matrix ----------------------------------------


def precision_at_k(nn_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Mean share of the top k neighbours that share the query's class."""
    hits = _hits(nn_labels, query_labels)
    _check_width(k, hits.shape[1])
    return float(_pq_precision(hits, k).mean())


def recall_at_k(nn_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Share of queries with at least one correct neighbour in the top k."""
    hits = _hits(nn_labels, query_labels)
    _check_width(k, hits.shape[1])
    return float(_pq_recall(hits, k).mean())


def r_precision(
    nn_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray | int
) -> float:
    """Precision in the top R per query; queries with R = 0 are left out."""
    hits = _hits(nn_labels, query_labels)
    r = _relevant(num_relevant, len(hits))
    return float(_pq_r_precision(hits, r)[r > 0].mean())


def map_at_r(
    nn_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray | int
) -> float:
    """MAP@R (Musgrave et al. 2020): AP over the top R, divided by R; R = 0 queries left out."""
    hits = _hits(nn_labels, query_labels)
    r = _relevant(num_relevant, len(hits))
    return float(_pq_average_precision(hits, r, at_r=True)[r > 0].mean())


def mean_average_precision(
    nn_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray | int
) -> float:
    """AP over the whole retrieved list divided by R (pml's definition); R = 0 queries left out.

    This is the full-ranking mAP only when every relevant item was retrieved.
    """
    hits = _hits(nn_labels, query_labels)
    r = _relevant(num_relevant, len(hits))
    return float(_pq_average_precision(hits, r, at_r=False)[r > 0].mean())


def num_relevant(
    query_labels: np.ndarray, gallery_labels: np.ndarray, leave_one_out: bool = False
) -> np.ndarray:
    """R per query: gallery items of its class, minus the query itself in leave-one-out."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    found = classes[pos] == query_labels
    r = np.where(found, counts[pos], 0).astype(np.int64)
    return np.maximum(r - int(leave_one_out), 0)


# --- retrieval from embeddings ------------------------------------------------------------


def score_neighbours(
    chunks: Iterable[tuple[int, np.ndarray, np.ndarray]],
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    relevant: np.ndarray,
    ks: Sequence[int] = (1,),
    keep: int = 0,
    r_k: int | None = None,
) -> tuple[dict[str, float], Neighbours]:
    """Reduce chunked search results (`mltrain.retrieval.index.search_chunks` style) to metrics.

    Only per-query scores and the first `keep` neighbour columns are kept, so memory stays
    O(n_queries * keep) whatever k the search used. Index -1 (an approximate index that
    found fewer than k items) counts as a miss; its entry in `Neighbours.labels` is
    meaningless. `r_k` is passed to `per_query_scores`.
    """
    n = len(query_labels)
    names = [f"{m}_at_{k}" for k in ks for m in ("precision", "recall")]
    names += ["r_precision", "map_at_r", "mean_average_precision"]
    per_query = {name: np.zeros(n) for name in names}
    kept: dict[str, np.ndarray] = {}
    for start, scores, indices in chunks:
        stop = start + len(indices)
        labels = gallery_labels[indices]
        hits = (labels == query_labels[start:stop, None]) & (indices >= 0)
        for name, values in per_query_scores(hits, relevant[start:stop], ks, r_k).items():
            per_query[name][start:stop] = values
        if keep:
            for name, arr in (("indices", indices), ("scores", scores), ("labels", labels)):
                if name not in kept:
                    kept[name] = np.empty((n, min(keep, arr.shape[1])), dtype=arr.dtype)
                kept[name][start:stop] = arr[:, :keep]
    scored = relevant > 0
    metrics = {name: float(values[scored].mean()) for name, values in per_query.items()}
    empty = np.empty((n, 0))
    neighbours = Neighbours(
        indices=kept.get("indices", empty.astype(np.int64)),
        scores=kept.get("scores", empty.astype(np.float32)),
        labels=kept.get("labels", empty.astype(gallery_labels.dtype)),
        query_labels=query_labels,
        scored=scored,
    )
    return metrics, neighbours


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    metric: str = "cosine",
    ks: Sequence[int] = (1, 5, 10),
    max_k: int = 1000,
) -> tuple[dict[str, float], Neighbours]:
    """Retrieval metrics of queries against a gallery, plus the neighbours for per-class views.

    Without a gallery every query searches the other queries (leave-one-out: a query never
    retrieves itself). One exact search; the R-based metrics use its first
    r_k = min(max_k, max R, gallery size) results, which is pml's `k="max_bin_count"`, and the
    search goes deeper only as far as max(ks) and the 5 columns `per_class_metrics` needs.
    When R > max_k for some class, its r_precision and map_at_r see only the first max_k
    results (map_at_r then under-estimates).

    Returns `(metrics, neighbours)`. `metrics` has precision_at_{k} and recall_at_{k} for each
    k in ks, r_precision, map_at_r, mean_average_precision (averaged over scored queries),
    num_queries (scored queries), num_lone_queries (queries left out because their class has
    no other gallery item), embedding_dim and search_k. `neighbours` (see `Neighbours`) keeps
    the top max(10, max(ks)) neighbours of every query.
    """
    check_metric(metric)
    ks = _check_ks(ks)
    if not isinstance(max_k, (int, np.integer)) or max_k < 1:
        raise ConfigError(f"max_k must be a positive integer, got {max_k!r}")
    leave_one_out = gallery_emb is None
    if leave_one_out:
        if gallery_labels is not None:
            raise DataError("gallery_labels were given without gallery_emb; pass both or neither")
        query_emb, query_labels = check_labelled(query_emb, query_labels, "embeddings")
        gallery_emb, gallery_labels = query_emb, query_labels
    else:
        if gallery_labels is None:
            raise DataError("gallery_emb was given without gallery_labels; pass both or neither")
        query_emb, query_labels = check_labelled(query_emb, query_labels, "query embeddings", 1)
        gallery_emb, gallery_labels = check_labelled(
            gallery_emb, gallery_labels, "gallery embeddings"
        )
    if gallery_emb.shape[1] != query_emb.shape[1]:
        raise DataError(
            f"query dimension {query_emb.shape[1]} != gallery dimension {gallery_emb.shape[1]}"
        )
    relevant = num_relevant(query_labels, gallery_labels, leave_one_out)
    if not (relevant > 0).any():
        raise DataError(
            "no query has another item of its class in the gallery; check that query and "
            "gallery labels use the same class ids"
        )
    available = len(gallery_emb) - int(leave_one_out)
    if max(ks) > available:
        raise ConfigError(
            f"ks include k={max(ks)} but the gallery has only {available} retrievable items; "
            f"lower ks"
        )
    r_k = min(available, max_k, int(relevant.max()))
    k = min(available, max(max(ks), PER_CLASS_K, r_k))
    chunks = knn_chunks(query_emb, gallery_emb, k, metric, exclude_self=leave_one_out)
    keep = min(k, max(10, max(ks)))
    metrics, neighbours = score_neighbours(
        chunks, query_labels, gallery_labels, relevant, ks, keep, r_k
    )
    metrics.update(
        num_queries=int((relevant > 0).sum()),
        num_lone_queries=int((relevant == 0).sum()),
        embedding_dim=int(query_emb.shape[1]),
        search_k=int(k),
    )
    return metrics, neighbours


def book_accuracy(emb: np.ndarray, labels: np.ndarray, k: int = 4) -> float:
    """The book's reference score: each image queries all others by brute-force L2 distance
    and scores the share of its k nearest others that have its class; mean over all images.

    Unlike `retrieval_metrics`, images whose class has no other image are kept (and score 0),
    to stay identical to the protocol the project's baseline numbers were produced with.
    """
    emb, labels = check_labelled(emb, labels)
    total = 0.0
    for start, _, indices in knn_chunks(emb, emb, k, "l2", exclude_self=True):
        hits = labels[indices] == labels[start : start + len(indices), None]
        total += float(hits.sum()) / k
    return total / len(emb)


# --- per-class views ----------------------------------------------------------------------


def class_name(label: Any, class_names: ClassNames) -> str:
    """Display name of a label: `class_names[label]` (list or dict), or str(label) without."""
    if class_names is None:
        return str(label)
    if isinstance(class_names, Mapping):
        if label not in class_names:
            raise DataError(f"label {_plain(label)!r} has no entry in class_names")
        return str(class_names[label])
    idx = int(label)
    if not 0 <= idx < len(class_names):
        raise DataError(
            f"label {_plain(label)!r} is outside class_names ({len(class_names)} names)"
        )
    return str(class_names[idx])


def per_class_metrics(
    nn_labels: np.ndarray, query_labels: np.ndarray, class_names: ClassNames = None
) -> dict[str, dict[str, float]]:
    """Per query class: precision_at_1, precision_at_5 and num_queries, keyed by class name.

    Pass only scored queries (see `Neighbours.scored`) to match `retrieval_metrics`.
    """
    hits = _hits(nn_labels, query_labels)
    _check_width(PER_CLASS_K, hits.shape[1])
    classes, inverse = np.unique(query_labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    p1 = np.bincount(inverse, weights=_pq_precision(hits, 1), minlength=len(classes))
    p5 = np.bincount(inverse, weights=_pq_precision(hits, 5), minlength=len(classes))
    return {
        class_name(c, class_names): {
            "precision_at_1": float(p1[i] / counts[i]),
            "precision_at_5": float(p5[i] / counts[i]),
            "num_queries": int(counts[i]),
        }
        for i, c in enumerate(classes)
    }


def mean_per_class_precision_at_1(per_class: Mapping[str, Mapping[str, float]]) -> float:
    """Class-balanced P@1: every class weighs the same, however many queries it has."""
    if not per_class:
        raise DataError("per_class is empty; no queries were scored")
    return float(np.mean([v["precision_at_1"] for v in per_class.values()]))


def worst_classes(
    per_class: Mapping[str, Mapping[str, float]], n: int = 10
) -> list[tuple[str, float]]:
    """The n classes with the lowest precision_at_1 as (name, precision_at_1), worst first.

    Ties go to the class with more queries (a more reliable estimate), then by name.
    """
    rows = sorted(
        per_class.items(), key=lambda kv: (kv[1]["precision_at_1"], -kv[1]["num_queries"], kv[0])
    )
    return [(name, float(v["precision_at_1"])) for name, v in rows[:n]]


def confused_pairs(
    nn_labels: np.ndarray, query_labels: np.ndarray, class_names: ClassNames = None, n: int = 10
) -> list[tuple[str, str, int]]:
    """Most frequent (true class, retrieved class, count) among wrong top-1 neighbours."""
    hits = _hits(nn_labels, query_labels)
    wrong = ~hits[:, 0]
    true, got = np.asarray(query_labels)[wrong], np.asarray(nn_labels)[wrong, 0]
    if not len(true):
        return []
    classes, codes = np.unique(np.concatenate([true, got]), return_inverse=True)
    pair = codes[: len(true)] * len(classes) + codes[len(true) :]
    pairs, counts = np.unique(pair, return_counts=True)
    rows = [
        (
            class_name(classes[p // len(classes)], class_names),
            class_name(classes[p % len(classes)], class_names),
            int(c),
        )
        for p, c in zip(pairs, counts, strict=True)
    ]
    return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))[:n]
