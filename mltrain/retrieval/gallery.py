"""The gallery a bundle searches: one interface over every place its vectors can live.

Search, verify, add, serve and export talk to a `Gallery`, never to Faiss or a database
directly, so a bundle's vectors may sit in its own `index.faiss` (the default, self-contained)
or in a vector database (`mltrain.retrieval.milvus`) without those commands changing.

A backend is a class registered in `GALLERIES` (a loader, so its client library is only
imported when a bundle uses it) with three class methods, `check` (settings, before anything
is embedded), `build` (a new gallery while a bundle is exported into a staging folder) and
`open` (the gallery of a loaded bundle), and the instance methods of `Gallery`; a backend
whose vectors may live outside the bundle also has `retire` (`retire_replaced`). Which backend
an `export.index` kind belongs to is `backend_of`: a backend's own name (`milvus`), else one
of Faiss's index types (`flat`, `hnsw`, `ivf_flat`, `ivf_hnsw`, `ivf_pq`).

Every vector given to or searched in a gallery is already prepared (`index.prepare`: float32,
unit length for cosine); rows are the bundle's metadata rows, 0 to count - 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from mltrain.errors import BundleError, ConfigError
from mltrain.registry import Registry
from mltrain.retrieval.index import check_index_metric, load_index, save_index
from mltrain.retrieval.index_types import (
    INDEX_TYPES,
    build_index,
    check_index_args,
    check_index_config,
)
from mltrain.retrieval.shards import ShardReader, index_from_shards

INDEX = "index.faiss"  # the Faiss backend's one bundle file
FAISS = "faiss"

GALLERIES = Registry("gallery backend")


class Gallery(Protocol):
    """What the commands need from wherever a bundle's vectors are stored."""

    backend: str

    @property
    def dim(self) -> int:
        """Length of the vectors it takes (after any PCA inside it: the query length)."""
        ...

    def count(self) -> int:
        """Vectors it holds for the bundle (its rows)."""
        ...

    def check_metric(self, metric: str) -> None:
        """Refuse a metric other than the one it ranks by (a wrong one ranks silently wrong)."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (n_queries, k); unfilled slots have row -1. A class filter
        is `mltrain.retrieval.search.gallery_search`'s: exact, from the stored embeddings."""
        ...

    def add(self, vectors: np.ndarray, labels: Sequence[int], paths: Sequence[str]) -> None:
        """Append rows count, count + 1, ... (class and path kept where the backend stores them)."""
        ...

    def save(self, folder: Path) -> list[str]:
        """Write what the bundle folder `folder` must hold; returns the names to hash."""
        ...

    def describe(self, folder: Path) -> dict[str, Any]:
        """The manifest's record of it (beside kind, args and pca_dim)."""
        ...

    def close(self) -> None:
        """Let go of files and connections (before the bundle folder is renamed)."""
        ...


def backend_of(kind: str) -> str:
    """The backend that stores an `export.index` kind: a backend named so, else Faiss."""
    return kind if kind in GALLERIES and kind != FAISS else FAISS


def backend_class(name: str) -> Any:
    """The class registered as backend `name` (its module imported now)."""
    return GALLERIES.get(name)()


def manifest_backend(manifest: dict[str, Any]) -> str:
    """A bundle's backend: its manifest's index.backend (Faiss for bundles older than it)."""
    name = (manifest.get("index") or {}).get("backend", FAISS)
    if not isinstance(name, str) or name not in GALLERIES:
        raise BundleError(f"manifest index.backend {str(name)[:40]!r} is not one of "
                          f"{', '.join(GALLERIES.names())}; re-export the bundle")  # fmt: skip
    return name


def hashed_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The gallery's bundle files that the manifest hashes (Faiss: index.faiss)."""
    return tuple(backend_class(manifest_backend(manifest)).FILES)


def own_names() -> set[str]:
    """Every name a backend may write into a bundle folder (none is a foreign file)."""
    return {n for name in GALLERIES.names() for n in GALLERIES.get(name)().NAMES}


def open_gallery(folder: Path, manifest: dict[str, Any], metadata: list[dict]) -> Gallery:
    """The gallery of the bundle at `folder`, checked against its manifest."""
    return backend_class(manifest_backend(manifest)).open(folder, manifest, metadata)


def check_gallery(kind: str, args: Any, rows: int, n_train: int, dim: int, metric: str,
                  pca_dim: int | None) -> str | None:  # fmt: skip
    """Settings checked before any image is embedded; a note where the data is thin."""
    return backend_class(backend_of(kind)).check(kind, args, rows, n_train, dim, metric, pca_dim)


def build_gallery(kind: str, args: Any, pca_dim: int | None, metric: str,
                  source: np.ndarray | ShardReader, labels: Sequence[int], paths: Sequence[str],
                  folder: Path, target: Path) -> Gallery:  # fmt: skip
    """A gallery of `source` (raw embeddings: an array, or a sharded gallery's reader) for a
    bundle being written into staging `folder`, to be moved to `target`."""
    cls = backend_class(backend_of(kind))
    return cls.build(kind, args, pca_dim, metric, source, labels, paths, folder, target)


def retire_replaced(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """After an export swapped its bundle (manifest index `new`) in over one whose manifest
    index was `old`: the old backend lets go of what only the replaced bundle used outside
    its folder (Milvus: a collection mltrain named on a server). Returns a line to print, or
    None; never raises (the export is done)."""
    name = (old or {}).get("backend")
    if not isinstance(name, str) or name not in GALLERIES:
        return None
    retire = getattr(backend_class(name), "retire", None)
    return retire(old, new) if retire is not None else None


# --- Faiss ---------------------------------------------------------------------------------


class FaissGallery:
    """A Faiss index in the bundle's index.faiss: today's self-contained bundle."""

    backend = FAISS
    FILES = (INDEX,)
    NAMES = (INDEX,)

    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def count(self) -> int:
        return int(self.index.ntotal)

    def check_metric(self, metric: str) -> None:
        check_index_metric(self.index, metric)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def add(self, vectors: np.ndarray, labels: Sequence[int], paths: Sequence[str]) -> None:
        self.index.add(vectors)

    def save(self, folder: Path) -> list[str]:
        save_index(self.index, folder / INDEX)
        return [INDEX]

    def describe(self, folder: Path) -> dict[str, Any]:
        # as serialised; no second copy in memory
        return {"ntotal": self.count(), "bytes": (folder / INDEX).stat().st_size}

    def close(self) -> None:
        """Nothing to let go of: the index lives in memory."""

    @classmethod
    def check(cls, kind: str, args: Any, rows: int, n_train: int, dim: int, metric: str,
              pca_dim: int | None) -> str | None:  # fmt: skip
        if kind in INDEX_TYPES:  # an unknown kind is named below, with the valid ones
            check_index_args(kind, args, "export.index_args")
        return check_index_config(kind, n_train, dim, metric, pca_dim, args)

    @classmethod
    def build(cls, kind: str, args: Any, pca_dim: int | None, metric: str,
              source: np.ndarray | ShardReader, labels: Sequence[int], paths: Sequence[str],
              folder: Path, target: Path) -> FaissGallery:  # fmt: skip
        if isinstance(source, ShardReader):
            index = index_from_shards(kind, source, metric, pca_dim, args)
        else:
            index = build_index(kind, source, metric, pca_dim, args)
        return cls(index)

    @classmethod
    def open(cls, folder: Path, manifest: dict[str, Any], metadata: list[dict]) -> FaissGallery:
        index = load_index(folder / INDEX)
        count, dim = manifest["count"], manifest["embedding_dim"]
        if index.ntotal != count:
            raise BundleError(f"{folder / INDEX} holds {index.ntotal} vectors but manifest.json "
                              f"says {count}; re-export the bundle")  # fmt: skip
        if index.d != dim:
            raise BundleError(f"{folder / INDEX} takes {index.d}-d queries, embeddings are {dim}-d")
        _apply_search_params(index, manifest["index"].get("args") or {})
        return cls(index)


def _apply_search_params(index: faiss.Index, args: dict[str, Any]) -> None:
    """Re-apply efSearch / nprobe from the manifest (Faiss stores them, this is a safeguard).
    An IVF's HNSW quantizer (`ivf_hnsw`) takes the efSearch, never below nprobe."""
    inner = index
    if isinstance(index, faiss.IndexPreTransform):
        inner = faiss.downcast_index(index.index)
    inner = faiss.downcast_index(inner)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and "nprobe" in args:
        ivf.nprobe = min(int(args["nprobe"]), ivf.nlist)
    graph = inner if ivf is None else faiss.downcast_index(ivf.quantizer)
    if "ef_search" in args and hasattr(graph, "hnsw"):
        floor = 1 if ivf is None else ivf.nprobe
        graph.hnsw.efSearch = max(int(args["ef_search"]), floor)


def _milvus() -> type:
    from mltrain.retrieval.milvus import MilvusGallery

    return MilvusGallery


_LOADERS: dict[str, Callable[[], type]] = {FAISS: lambda: FaissGallery, "milvus": _milvus}
for _name, _loader in _LOADERS.items():
    GALLERIES.register(_name, _loader)


def label_of(classes: list[str], name: str | None) -> int | None:
    """The label of class `name` for a filtered search (None: no filter)."""
    if name is None:
        return None
    if name not in classes:
        raise ConfigError(f"class {name!r} is no class of this bundle; pass one of its classes")
    return classes.index(name)
