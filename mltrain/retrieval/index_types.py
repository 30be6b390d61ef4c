"""The index vocabulary: which Faiss index types an export or a sweep may name (`INDEX_TYPES`),
the arguments each takes, sizes fitted to the gallery, and the PCA stored inside an index.
Searching a built index is `mltrain.retrieval.index`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np

from mltrain.errors import ConfigError, DataError
from mltrain.registry import Registry
from mltrain.retrieval.index import exact_index, faiss_metric, prepare

INDEX_TYPES = Registry("index type")


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"index arg {name} must be a positive integer, got {value!r}")
    return int(value)


def default_nlist(n_train: int) -> int:
    """About 4*sqrt(n) lists, but at least 39 training points per list (Faiss's own minimum)."""
    return int(np.clip(round(4 * math.sqrt(n_train)), 1, max(1, n_train // 39)))


def graph_nlist(n_train: int) -> int:
    """`ivf_hnsw`'s lists: 8*sqrt(n) rounded to a power of two (8,192 at a million rows), as
    many as `default_nlist` allows (39 training points per list). Its HNSW quantizer finds a
    query's lists without scanning every centroid, so more and shorter lists pay."""
    wanted = 2 ** round(math.log2(8 * math.sqrt(max(n_train, 1))))
    return int(min(wanted, max(1, n_train // 39)))


def fitted_nlist(kind: str, n_train: int) -> int:
    """The lists an unset `nlist` of IVF type `kind` gets for `n_train` rows."""
    return graph_nlist(n_train) if kind == "ivf_hnsw" else default_nlist(n_train)


def _ivf_nlist(nlist: int | None, n_train: int, kind: str = "ivf_flat") -> int:
    nlist = fitted_nlist(kind, n_train) if nlist is None else _positive("nlist", nlist)
    if nlist > n_train:
        raise ConfigError(
            f"IVF with nlist={nlist} needs at least {nlist} training vectors, got {n_train}; "
            f"lower nlist or leave it unset"
        )
    return nlist


@INDEX_TYPES.register("flat")
def _flat(dim: int, metric_type: int, n_train: int) -> faiss.Index:
    return exact_index(dim, metric_type)


@INDEX_TYPES.register("hnsw")
def _hnsw(
    dim: int,
    metric_type: int,
    n_train: int,
    M: int = 32,  # noqa: N803 - Faiss's own name for the graph degree
    ef_construction: int = 200,
    ef_search: int = 128,
) -> faiss.Index:
    index = faiss.IndexHNSWFlat(dim, _positive("M", M), metric_type)
    index.hnsw.efConstruction = _positive("ef_construction", ef_construction)
    index.hnsw.efSearch = _positive("ef_search", ef_search)
    return index


@INDEX_TYPES.register("ivf_flat")
def _ivf_flat(
    dim: int, metric_type: int, n_train: int, nlist: int | None = None, nprobe: int = 16
) -> faiss.Index:
    nlist = _ivf_nlist(nlist, n_train)
    index = faiss.IndexIVFFlat(exact_index(dim, metric_type), dim, nlist, metric_type)
    index.nprobe = min(_positive("nprobe", nprobe), nlist)
    return index


IVF_CODECS = {"flat": None, "fp16": faiss.ScalarQuantizer.QT_fp16,
              "sq8": faiss.ScalarQuantizer.QT_8bit}  # fmt: skip


GRAPH_POINTS_PER_LIST = 32  # k-means rows sampled per list for ivf_hnsw (Faiss default: 256)
GRAPH_KMEANS_ITER = 10


@INDEX_TYPES.register("ivf_hnsw")
def _ivf_hnsw(
    dim: int,
    metric_type: int,
    n_train: int,
    nlist: int | None = None,
    nprobe: int = 5,
    ef_search: int = 16,
    M: int = 32,  # noqa: N803 - Faiss's own name for the graph degree
    codec: str = "fp16",
) -> faiss.Index:
    """IVF whose coarse quantizer is an HNSW graph over the list centroids (Faiss's
    `IVF{nlist}_HNSW{M}`): a query reaches its `nprobe` lists in a few hundred distance
    computations instead of one per list. `ef_search` is the graph's, raised to `nprobe`
    where lower; the lists hold vectors as `codec`: flat (float32), fp16 or sq8 (8 bits)."""
    if not isinstance(codec, str) or codec not in IVF_CODECS:
        raise ConfigError(f"index arg codec must be one of {', '.join(IVF_CODECS)}, "
                          f"got {codec!r}")  # fmt: skip
    nlist = _ivf_nlist(nlist, n_train, "ivf_hnsw")
    nprobe = min(_positive("nprobe", nprobe), nlist)
    degree = _positive("M", M)
    quantizer = faiss.IndexHNSWFlat(dim, degree, metric_type)
    quantizer.hnsw.efConstruction = 2 * degree  # as benchmarks/ann.py measured it
    quantizer.hnsw.efSearch = max(_positive("ef_search", ef_search), nprobe)
    if IVF_CODECS[codec] is None:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric_type)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, IVF_CODECS[codec],
                                              metric_type)  # fmt: skip
    index.nprobe = nprobe
    # train: exact k-means (a flat assigner, as ivf_flat's), then the centroids go into the
    # graph once; by default Faiss would rebuild the graph and assign through it each round
    index.quantizer_trains_alone = 2
    # k-means as benchmarks/ann.py measured it (200,000 rows for 8,192 lists, 10 rounds):
    # Faiss's defaults (256 rows a list, 25 rounds) would cluster every row of a million
    index.cp.max_points_per_centroid, index.cp.niter = GRAPH_POINTS_PER_LIST, GRAPH_KMEANS_ITER
    return index


PQ_MIN_BITS = 4
PQ_ROWS_PER_CENTROID = 10  # fitted code size: at least this many training rows per centroid


def fitted_nbits(n_train: int) -> int:
    """PQ bits per code for `n_train` rows: 8 (256 centroids) when there are 2,560 rows or more,
    fewer below, so that every centroid has about 10 rows to learn from."""
    return int(min(8, math.floor(math.log2(max(n_train, 1) / PQ_ROWS_PER_CENTROID))))


def fitted_m(dim: int, wanted: int = 16) -> int:
    """Sub-quantizers: the largest divisor of `dim` up to `wanted` (16 for 1280-d embeddings)."""
    return max(m for m in range(1, min(wanted, dim) + 1) if dim % m == 0)


@INDEX_TYPES.register("ivf_pq")
def _ivf_pq(
    dim: int,
    metric_type: int,
    n_train: int,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int | None = None,
    nprobe: int = 16,
) -> faiss.Index:
    """IVF with product-quantised codes; unset `m` and `nbits` are fitted to dim and rows."""
    nlist = _ivf_nlist(nlist, n_train)
    m = fitted_m(dim) if m is None else _positive("m", m)
    if nbits is None:
        nbits = fitted_nbits(n_train)
        if nbits < PQ_MIN_BITS:
            raise ConfigError(
                f"ivf_pq needs at least {PQ_ROWS_PER_CENTROID << PQ_MIN_BITS} training vectors "
                f"for {PQ_MIN_BITS}-bit codes, got {n_train}; use flat or hnsw"
            )
    nbits = _positive("nbits", nbits)
    if dim % m:
        raise ConfigError(f"ivf_pq: m={m} sub-quantizers must divide the dimension {dim}")
    if n_train < 2**nbits:
        raise ConfigError(
            f"ivf_pq with nbits={nbits} needs at least {2**nbits} training vectors, "
            f"got {n_train}; lower nbits or leave it unset"
        )
    quantizer = exact_index(dim, metric_type)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, metric_type)
    index.nprobe = min(_positive("nprobe", nprobe), nlist)
    return index


BUILDER_ARGS = ("dim", "metric_type", "n_train")  # every builder's, filled in here, not by users


def index_arg_names(kind: str) -> list[str]:
    """The arguments a user may give index type `kind` (`export.index_args`), read from its
    builder's signature so the list cannot drift from the code."""
    return [name for name in INDEX_TYPES.arguments(kind) if name not in BUILDER_ARGS]


def check_index_args(kind: str, args: Any, where: str = "index_args") -> None:
    """Refuse keys that index type `kind` does not take, naming only those and the ones it
    does take (a builder's TypeError would name its internals, or let `dim` override the
    real one)."""
    if args is None:
        return
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where} must be a mapping such as {{M: 32}}, got {args!r:.60}")
    takes = index_arg_names(kind)
    bad = [str(name) for name in args if name not in takes]
    if bad:
        offer = f"takes {', '.join(takes)}" if takes else "takes no arguments"
        raise ConfigError(f"{where}: {kind} {offer} (got {', '.join(sorted(bad))})")


def make_index(kind: str, args: Any, dim: int, metric: str, n_train: int) -> faiss.Index:
    """An empty index of type `kind` from checked user `args` (see `check_index_args`)."""
    check_index_args(kind, args)
    spec = {"name": kind, "args": args or {}}
    return INDEX_TYPES.build(spec, dim=dim, metric_type=faiss_metric(metric), n_train=n_train)


def sparse_training_note(index: faiss.Index, n_train: int) -> str | None:
    """One line where k-means gets fewer rows per centroid than Faiss recommends (39), instead
    of Faiss's own warning printed once per sub-quantizer; its clustering is quieted here."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    parts = []
    for name, cp, k in [("coarse lists", ivf.cp, ivf.nlist)] + _pq_clusterings(ivf):
        if n_train < k * cp.min_points_per_centroid:
            parts.append(f"{k} {name}")
        cp.min_points_per_centroid = 1  # the note below replaces Faiss's stderr warning
    if not parts:
        return None
    return (
        f"{' and '.join(parts)} trained on {n_train} rows (Faiss recommends 39 per centroid); "
        "approximate results may be coarser than on a large gallery"
    )


def _pq_clusterings(ivf: faiss.Index) -> list[tuple[str, Any, int]]:
    pq_index = faiss.downcast_index(ivf)
    if not hasattr(pq_index, "pq"):
        return []
    pq = pq_index.pq
    return [(f"PQ centroids per sub-quantizer x {pq.M}", pq.cp, pq.ksub)]


def pca_transforms(
    train_vectors: np.ndarray, pca_dim: int, metric: str = "cosine"
) -> list[faiss.VectorTransform]:
    """Trained transform chain: PCA to `pca_dim`, then re-normalisation for cosine.

    `train_vectors` must already be prepared (unit length for cosine). Re-normalising after
    the projection keeps the inner product a cosine similarity.
    """
    dim = train_vectors.shape[1]
    if not isinstance(pca_dim, (int, np.integer)) or not 1 <= pca_dim <= dim:
        raise ConfigError(f"pca_dim={pca_dim} must be an integer between 1 and the dim {dim}")
    if len(train_vectors) < pca_dim:
        raise ConfigError(
            f"pca_dim={pca_dim} needs at least {pca_dim} training vectors, got {len(train_vectors)}"
        )
    pca = faiss.PCAMatrix(dim, int(pca_dim))
    pca.train(train_vectors)
    return _chain(pca, metric)


def _chain(pca: faiss.PCAMatrix, metric: str) -> list[faiss.VectorTransform]:
    chain: list[faiss.VectorTransform] = [pca]
    if metric == "cosine":
        chain.append(faiss.NormalizationTransform(int(pca.d_out), 2.0))
    return chain


def shorter_pca(
    trained: list[faiss.VectorTransform], pca_dim: int, metric: str
) -> list[faiss.VectorTransform]:
    """The chain of `pca_transforms` at a shorter `pca_dim`, cut from an already trained one:
    PCA components are nested (the first k of a longer projection are the k-long one), so a
    sweep over lengths trains one PCA instead of one per length. On long embeddings each
    training takes minutes (Faiss: one eigendecomposition of the covariance)."""
    long = faiss.downcast_VectorTransform(trained[0])
    if not 1 <= pca_dim <= long.d_out:
        raise ConfigError(f"pca_dim={pca_dim} must be between 1 and the trained {long.d_out}")
    pca = faiss.PCAMatrix(long.d_in, int(pca_dim))
    pca.mean, pca.eigenvalues, pca.PCAMat = long.mean, long.eigenvalues, long.PCAMat
    pca.is_trained = True
    pca.prepare_Ab()
    return _chain(pca, metric)


def with_transforms(index: faiss.Index, chain: list[faiss.VectorTransform]) -> faiss.Index:
    """Wrap `index` so that `chain` runs inside it on every add and search (and is saved)."""
    if not chain:
        return index
    wrapped = faiss.IndexPreTransform(index)
    for t in reversed(chain):
        wrapped.prepend_transform(t)
    return wrapped


def apply_transforms(chain: list[faiss.VectorTransform], x: np.ndarray) -> np.ndarray:
    """Run prepared vectors through a trained chain outside an index (float32 out)."""
    for t in chain:
        x = t.apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(
    kind: str,
    vectors: np.ndarray,
    metric: str = "cosine",
    pca_dim: int | None = None,
    args: dict[str, Any] | None = None,
    train_vectors: np.ndarray | None = None,
) -> faiss.Index:
    """Build, train and fill an index of type `kind` (see `INDEX_TYPES.names()`).

    With `pca_dim` the PCA (fitted on `train_vectors`, default `vectors`) is stored inside
    the index as an `IndexPreTransform`, so a saved index takes raw embeddings as queries.
    """
    vectors = prepare(vectors, metric, "vectors")
    train = vectors if train_vectors is None else prepare(train_vectors, metric, "train_vectors")
    if train.shape[1] != vectors.shape[1]:
        raise DataError(
            f"train_vectors have dimension {train.shape[1]}, vectors have {vectors.shape[1]}"
        )
    index = train_index(kind, train, metric, pca_dim, args)
    index.add(vectors)
    return index


def train_index(
    kind: str,
    train: np.ndarray,
    metric: str = "cosine",
    pca_dim: int | None = None,
    args: dict[str, Any] | None = None,
) -> faiss.Index:
    """An empty index of type `kind`, trained (PCA included) on prepared `train` vectors.

    Split from `build_index` so that a gallery too large for memory can be added in chunks
    after training on a sample (see `mltrain.retrieval.shards.index_from_shards`).
    """
    chain = [] if pca_dim is None else pca_transforms(train, pca_dim, metric)
    dim = train.shape[1] if pca_dim is None else int(pca_dim)
    index = make_index(kind, args, dim, metric, len(train))
    sparse_training_note(index, len(train))  # quiets Faiss; check_index_config reports it
    index = with_transforms(index, chain)
    index.train(train)
    return index


def check_index_config(
    kind: str,
    n_train: int,
    dim: int,
    metric: str = "cosine",
    pca_dim: int | None = None,
    args: dict[str, Any] | None = None,
) -> str | None:
    """Validate an index configuration for `n_train` rows of `dim` before any embedding work:
    builds the (empty, untrained) index, which is cheap, so bad args fail now with a
    `ConfigError`. Returns a note when the data is thin for its clustering, else None."""
    if pca_dim is not None and not 1 <= pca_dim <= min(dim, n_train):
        raise ConfigError(
            f"pca_dim={pca_dim} must be between 1 and min(embedding length {dim}, "
            f"training rows {n_train}) = {min(dim, n_train)}"
        )
    index = make_index(kind, args, pca_dim or dim, metric, n_train)
    return sparse_training_note(index, n_train)
