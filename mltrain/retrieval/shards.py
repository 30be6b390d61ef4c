"""Embeddings larger than memory: fixed-size `.npy` shards, written and read through mmap.

`ShardWriter` maps one shard at a time with `numpy.lib.format.open_memmap`, fills it from
streamed batches, then flushes and unmaps it, so writing a gallery of any size holds at
most one shard's pages plus the batch in hand. `ShardReader` presents the shards as one
(rows, dim) array without reading them: every access maps the shards it needs with
`mmap_mode="r"` and unmaps them afterwards, so a pass over the whole gallery (`chunks`,
`sample`) has at most one shard resident at a time, whatever the gallery size.

Shards are plain `.npy` files (`embeddings-00000.npy`, `embeddings-00001.npy`, ...) that
`numpy.load(..., allow_pickle=False)` reads; `index_from_shards` builds a Faiss index over
them with the same bound on memory (plus the index itself).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.lib.format import open_memmap

from mltrain.errors import ConfigError, DataError
from mltrain.files import reserve
from mltrain.retrieval.index import faiss_metric, prepare
from mltrain.retrieval.index_types import INDEX_TYPES, fitted_nlist, train_index

SHARD_PREFIX = "embeddings"
SHARD_NAME = re.compile(rf"{SHARD_PREFIX}-\d{{5,}}\.npy")
CHUNK_ROWS = 65536  # rows per step of a pass over the shards (32 MiB at 128-d float32)
MIN_TRAIN_ROWS = 100_000  # rows sampled to train an index / PCA, at least
POINTS_PER_LIST = 256  # Faiss's k-means uses at most this many points per centroid


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}-{number:05d}.npy"


def shard_number(name: str) -> int:
    """The number in a shard file name: 7 for `embeddings-00007.npy`."""
    if not SHARD_NAME.fullmatch(name):
        raise DataError(f"{name!r} is not a shard file name ({shard_name(0)}, ...)")
    return int(name[len(SHARD_PREFIX) + 1 : -len(".npy")])


@dataclass(frozen=True)
class Shard:
    """One written shard: its file name (in the writer's folder) and row count."""

    name: str
    rows: int


class ShardWriter:
    """Streams (n, dim) batches into shards of `shard_rows` rows under `folder`.

    `total` (the rows that will come) sizes the last shard exactly, so no file is ever
    truncated or rewritten. `first` numbers the first shard (to append to existing ones).
    Call `close()` after the last batch: it checks that exactly `total` rows came.
    """

    def __init__(
        self,
        folder: str | Path,
        total: int,
        shard_rows: int,
        dtype: str | np.dtype = "float32",
        first: int = 0,
    ) -> None:
        if not isinstance(shard_rows, (int, np.integer)) or shard_rows < 1:
            raise ConfigError(f"shard size must be a positive number of rows, got {shard_rows!r}")
        if total < 0:
            raise DataError(f"a shard writer needs total >= 0 rows, got {total}")
        self.folder = Path(folder)
        self.total, self.shard_rows = int(total), int(shard_rows)
        self.dtype = np.dtype(dtype)
        self.first = first
        self.written = 0
        self.dim: int | None = None
        self.shards: list[Shard] = []
        self._current: np.memmap | None = None
        self._filled = 0  # rows written into the current shard

    def write(self, batch: np.ndarray) -> None:
        """Append `batch`'s rows, splitting it across shard boundaries as needed."""
        batch = np.asarray(batch)
        if batch.ndim != 2 or batch.shape[1] == 0:
            raise DataError(f"shard rows must come as a 2-D (n, dim) array, got {batch.shape}")
        if self.dim is None:
            self.dim = int(batch.shape[1])
        elif batch.shape[1] != self.dim:
            raise DataError(f"batch has dimension {batch.shape[1]}, earlier rows had {self.dim}")
        if self.written + len(batch) > self.total:
            raise DataError(
                f"{self.written + len(batch)} rows written, more than the {self.total} announced"
            )
        pos = 0
        while pos < len(batch):
            if self._current is None:
                self._open_next()
            assert self._current is not None
            take = min(len(self._current) - self._filled, len(batch) - pos)
            self._current[self._filled : self._filled + take] = batch[pos : pos + take]
            self._filled, pos, self.written = self._filled + take, pos + take, self.written + take
            if self._filled == len(self._current):
                self._finish_current()

    def close(self) -> list[Shard]:
        """The shards written, in order; an error if fewer rows came than announced."""
        if self.written != self.total:
            raise DataError(f"expected {self.total} rows for the shards, got {self.written}")
        return list(self.shards)

    def _open_next(self) -> None:
        rows = min(self.shard_rows, self.total - self.written)
        path = self.folder / shard_name(self.first + len(self.shards))
        if path.exists():  # it may be a hard link into another bundle: never write through it
            raise DataError(f"{path} already exists; shards are written once, never over")
        self._current = open_memmap(path, mode="w+", dtype=self.dtype, shape=(rows, self.dim))
        reserve(path)  # a full disk: an OSError here, not a SIGBUS while filling the map
        self._filled = 0

    def _finish_current(self) -> None:
        assert self._current is not None
        self._current.flush()
        name, rows = Path(self._current.filename).name, len(self._current)
        self._current = None  # the last reference: the map closes, its pages leave this process
        self.shards.append(Shard(name, rows))


def open_shard(path: str | Path) -> np.memmap:
    """A read-only memory map of one shard; an unreadable or non-2-D file is a DataError."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npy array ({e})") from None
    if not isinstance(arr, np.memmap) or arr.ndim != 2:
        raise DataError(f"{path} must hold a 2-D array, got shape {np.shape(arr)}")
    return arr


class ShardReader:
    """Shards read as one (rows, dim) array; each access maps what it needs, then unmaps.

    Indexing with an int, a slice or an array of row numbers returns an in-memory ndarray
    of just those rows. `np.asarray(reader)` materialises everything (small galleries only).
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        if not paths:
            raise DataError("a shard reader needs at least one shard file")
        self.paths = [Path(p) for p in paths]
        rows, dims, dtypes = [], set(), set()
        for p in self.paths:
            m = open_shard(p)  # reads the header only
            rows.append(m.shape[0])
            dims.add(m.shape[1])
            dtypes.add(m.dtype)
            del m
        if len(dims) > 1 or len(dtypes) > 1:
            raise DataError(
                f"shards {self.paths[0].parent} differ in dimension {sorted(dims)} or dtype "
                f"{sorted(map(str, dtypes))}; all shards of one gallery must match"
            )
        self.rows = rows
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), int(dims.pop()))
        self.dtype = dtypes.pop()

    ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.memmap]]:
        """`(first row, rows x dim memmap view)` over every shard in order, no copy made.

        A shard is mapped when its first chunk is asked for and unmapped once the caller
        drops the views of it, so a loop that does not keep chunks (`del chunk` at the end
        of its body: the loop variable would keep the last one) maps one shard at most.
        """
        if rows < 1:
            raise ConfigError(f"chunk rows must be positive, got {rows}")
        for i, path in enumerate(self.paths):
            shard = open_shard(path)
            for start in range(0, len(shard), rows):
                yield int(self.offsets[i]) + start, shard[start : start + rows]
            del shard

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The given rows (negative counts from the end) as one ndarray, shard by shard."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), self.shape[1]), dtype=self.dtype)
        for s in np.unique(which):
            sel = which == s
            shard = open_shard(self.paths[s])
            out[sel] = shard[idx[sel] - self.offsets[s]]
            del shard
        return out

    def sample(self, n: int) -> np.ndarray:
        """`n` rows spread evenly over the gallery (all rows, in order, when n >= len)."""
        count = min(int(n), len(self))
        rows = np.unique(np.linspace(0, len(self) - 1, num=count).round().astype(np.int64))
        return self.take(rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.take([key])[0]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(len(self))))
        if isinstance(key, (list, np.ndarray)):
            return self.take(key)
        raise TypeError(f"shards are indexed by row: an int, a slice or row numbers, not {key!r}")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=dtype or self.dtype)
        for start, chunk in self.chunks():
            out[start : start + len(chunk)] = chunk
            del chunk  # see `chunks`
        return out

    def __repr__(self) -> str:
        return f"ShardReader({len(self.paths)} shards, shape={self.shape}, dtype={self.dtype})"


def training_rows(total: int, nlist: int | None, per_list: int = POINTS_PER_LIST) -> int:
    """Rows to train an index on: what its k-means would use at most, 100k at least."""
    want = MIN_TRAIN_ROWS if nlist is None else max(MIN_TRAIN_ROWS, per_list * nlist)
    return min(total, want)


def _kmeans_rows_per_list(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return POINTS_PER_LIST if ivf is None else int(ivf.cp.max_points_per_centroid)


def _takes_nlist(kind: str) -> bool:
    return "nlist" in inspect.signature(INDEX_TYPES.get(kind)).parameters


def index_from_shards(
    kind: str,
    reader: ShardReader,
    metric: str = "cosine",
    pca_dim: int | None = None,
    args: dict[str, Any] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> faiss.Index:
    """`build_index` over shards without loading them: train (and fit the PCA) on an even
    sample where the index needs training, then add shard by shard in chunks.

    An unset IVF `nlist` is sized for the whole gallery, as `build_index` over all rows
    would. Peak memory: the index, the training sample and one shard.
    """
    args = dict(args or {})
    if _takes_nlist(kind) and args.get("nlist") is None:
        args["nlist"] = fitted_nlist(kind, len(reader))
    spec = {"name": kind, "args": args}  # building it checks the args, as build_index does
    index = INDEX_TYPES.build(spec, dim=reader.shape[1], metric_type=faiss_metric(metric),
                              n_train=len(reader))  # fmt: skip
    if pca_dim is not None or not index.is_trained:  # flat and HNSW alone need no sample
        rows = training_rows(len(reader), args.get("nlist"), _kmeans_rows_per_list(index))
        train = prepare(reader.sample(rows), metric, "shard sample")
        index = train_index(kind, train, metric, pca_dim, args)
        del train
    for _, chunk in reader.chunks(chunk_rows):
        index.add(prepare(chunk, metric, "shard rows"))
        del chunk  # else the last view of a shard keeps it mapped while the next one opens
    return index
