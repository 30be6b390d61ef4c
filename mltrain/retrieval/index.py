"""Chunked k-NN search over Faiss indexes, and index persistence.

Every nearest-neighbour search in mltrain goes through this module so that the metric
convention is decided in one place:

- "cosine": vectors are L2-normalised and searched by inner product; scores are cosine
  similarities, higher is better.
- "l2": vectors are searched as given; scores are *squared* Euclidean distances, lower is better.

Queries are searched in chunks so that the result buffers, not just the index, stay bounded
for galleries of a million vectors. Which index types exist, their arguments and the PCA
stored inside an index are `mltrain.retrieval.index_types`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

from mltrain.errors import BundleError, ConfigError, DataError
from mltrain.inference.vectors import l2_normalize

METRICS = ("cosine", "l2")
DEFAULT_CHUNK = 8192


def faiss_metric(metric: str) -> int:
    """The Faiss metric constant that implements `metric` (cosine = inner product)."""
    check_metric(metric)
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}'; valid metrics: {', '.join(METRICS)}")


def as_vectors(x: np.ndarray, name: str = "vectors") -> np.ndarray:
    """C-contiguous float32 2-D array, as Faiss requires; rejects empty or non-finite input."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name} must be a non-empty 2-D array (n, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{name} contain NaN or inf; check the model output before searching")
    return x


def prepare(x: np.ndarray, metric: str, name: str = "vectors") -> np.ndarray:
    """Vectors as the index expects them: float32, and unit length for cosine."""
    check_metric(metric)
    x = as_vectors(x, name)
    return l2_normalize(x) if metric == "cosine" else x


def check_k(k: int, gallery_size: int, exclude_self: bool = False) -> None:
    """Reject k that the gallery cannot fill, rather than let Faiss pad with -1."""
    available = gallery_size - (1 if exclude_self else 0)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got k={k}")
    if k > available:
        others = " other" if exclude_self else ""
        raise ConfigError(
            f"k={k} exceeds the gallery size {gallery_size} ({available}{others} items "
            f"can be retrieved); lower k or use a larger gallery"
        )


def drop_self(
    scores: np.ndarray, indices: np.ndarray, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from a k+1 result, where query row i is gallery row start+i.

    With exact duplicates Faiss may rank the duplicate first and push the row itself out of
    the k+1 results; such rows drop their last column instead, so every row keeps k items
    and none of them is the query itself.
    """
    n, width = indices.shape
    own = np.arange(start, start + n)[:, None]
    is_self = indices == own
    # First occurrence of self, or the last column when it is absent.
    pos = np.where(is_self.any(axis=1), is_self.argmax(axis=1), width - 1)
    keep = np.ones_like(is_self)
    keep[np.arange(n), pos] = False
    return scores[keep].reshape(n, width - 1), indices[keep].reshape(n, width - 1)


def search_chunks(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    metric: str = "cosine",
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Iterate `(start, scores, indices)` per chunk of queries so callers can reduce as they go.

    Arguments are checked now, not at the first iteration; queries are normalised chunk by
    chunk, so no full-size copy is made. Slots an approximate index cannot fill (e.g. IVF
    with few probes) have index -1.
    """
    check_index_metric(index, metric)
    queries = as_vectors(queries, "queries")
    if queries.shape[1] != index.d:
        raise DataError(f"queries have dimension {queries.shape[1]}, the index expects {index.d}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}")

    def chunks() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for start in range(0, len(queries), chunk_size):
            part = queries[start : start + chunk_size]
            scores, indices = index.search(prepare(part, metric, "queries"), k)
            yield start, scores, indices

    return chunks()


def check_index_metric(index: faiss.Index, metric: str) -> None:
    """A cosine search on an L2 index (or vice versa) silently ranks wrongly, so refuse it."""
    if index.metric_type != faiss_metric(metric):
        kind = "inner-product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "L2"
        raise ConfigError(f"metric '{metric}' does not match this {kind} index")


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    metric: str = "cosine",
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Search a built index; efSearch/nprobe are whatever the index stores (set at build time).

    Returns float32 scores and int64 indices of shape (n_queries, k); see the module
    docstring for the score convention.
    """
    check_k(k, index.ntotal)
    parts = list(search_chunks(index, queries, k, metric, chunk_size))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def exact_index(dim: int, metric_type: int) -> faiss.Index:
    """Empty brute-force index: IndexFlatIP for cosine (on unit vectors), IndexFlatL2 for l2."""
    if metric_type == faiss.METRIC_INNER_PRODUCT:
        return faiss.IndexFlatIP(dim)
    return faiss.IndexFlatL2(dim)


def flat_index(gallery: np.ndarray, metric: str = "cosine") -> faiss.Index:
    """Exact index over an already prepared gallery (see `prepare`)."""
    index = exact_index(gallery.shape[1], faiss_metric(metric))
    index.add(gallery)
    return index


def knn_chunks(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    metric: str = "cosine",
    exclude_self: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Exact k-NN, yielded per chunk of queries as `(start, scores, indices)`.

    `exclude_self=True` means the queries are the gallery (same rows, same order): each row
    gets its k nearest *other* rows.
    """
    gallery = prepare(gallery, metric, "gallery")
    queries = as_vectors(queries, "queries")
    if exclude_self and queries.shape != gallery.shape:
        raise DataError(
            f"exclude_self needs queries identical to the gallery, got shapes "
            f"{queries.shape} and {gallery.shape}"
        )
    check_k(k, len(gallery), exclude_self)
    index = flat_index(gallery, metric)  # holds its own copy of the gallery
    del gallery
    found = search_chunks(index, queries, k + int(exclude_self), metric, chunk_size)
    if not exclude_self:
        return found
    return ((start, *drop_self(scores, indices, start)) for start, scores, indices in found)


def timed_single_queries(
    search_one: Callable[[np.ndarray], Any], queries: np.ndarray, warmups: int = 1
) -> Iterator[tuple[float, Any]]:
    """(seconds, result) of `search_one` on each row of `queries` alone, in order.

    A user's query arrives alone, so latency is timed one query per call. The `warmups`
    untimed calls on the first rows run before this returns: the first calls pay one-off
    allocations that a warm index does not. The search, the sweeps and the ANN benchmark
    time queries this one way; a caller may stop iterating on a time budget."""
    for i in range(min(warmups, len(queries))):
        search_one(queries[i : i + 1])
    return _timed(search_one, queries)


def _timed(search_one: Callable[[np.ndarray], Any], queries: np.ndarray) -> Iterator:
    for i in range(len(queries)):
        start = time.perf_counter()
        out = search_one(queries[i : i + 1])
        yield time.perf_counter() - start, out


def knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    metric: str = "cosine",
    exclude_self: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest gallery rows for every query: `(scores, indices)`, each (n_queries, k)."""
    parts = list(knn_chunks(queries, gallery, k, metric, exclude_self, chunk_size))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


# --- persistence -------------------------------------------------------------------------


def index_nbytes(index: faiss.Index) -> int:
    """Serialised size: what the index costs on disk and, roughly, in memory."""
    return int(faiss.serialize_index(index).nbytes)


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write through a Python file, so a full or read-only disk is an OSError naming `path`
    (Faiss's own writer raises a RuntimeError with the errno only in its text)."""
    path = os.fspath(path)
    try:
        with open(path, "wb") as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def load_index(path: str | os.PathLike) -> faiss.Index:
    """Read an index written by `save_index`; missing or unreadable files are a BundleError.

    Bundles are untrusted: a crafted header could ask Faiss for a vector of a terabyte. No
    vector of a valid index is larger than the file, so Faiss's allocation limit is lowered
    to a bound from the file size while it reads, and an allocation failure is refused too.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BundleError(f"index file {path} does not exist; rebuild the search bundle")
    limit = faiss.get_deserialization_vector_byte_limit()
    faiss.set_deserialization_vector_byte_limit(min(limit, 4 * os.path.getsize(path) + 2**20))
    try:
        return faiss.read_index(path)
    except (RuntimeError, MemoryError, ValueError, OverflowError) as e:
        text = str(e).strip() or type(e).__name__
        first = text.splitlines()[-1][:300]
        raise BundleError(
            f"index file {path} is corrupt, crafted or not a Faiss index ({first}); "
            "rebuild the search bundle"
        ) from e
    finally:
        faiss.set_deserialization_vector_byte_limit(limit)
