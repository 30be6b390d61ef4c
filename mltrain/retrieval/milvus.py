"""A bundle's gallery in Milvus: `export --set export.index=milvus`.

By default the collection lives in Milvus Lite (in-process, a local database folder) inside
the bundle as `gallery.db`, so the bundle stays one folder that moves and swaps as a whole.
`export.index_args: {uri: http://host:19530}` (or an absolute `/path/to/gallery.db`) puts it
in a Milvus server (or a shared Lite folder) instead; each export then writes a collection
of its own, so the bundle an export replaces keeps working until the swap.

Rows are the primary key (`id` = the bundle's metadata row), with the class label and path
as scalar fields so a search can be filtered by class. Every search also filters on
`id < count` (the manifest's): rows that an interrupted `add` inserted before its bundle was
swapped in stay invisible, and the repeated `add` upserts the same ids.

The client library is imported only here, when a bundle uses Milvus; without it every use
is one line naming `pip install -e '.[milvus]'`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mltrain.errors import BundleError, ConfigError
from mltrain.retrieval.index import prepare
from mltrain.retrieval.shards import CHUNK_ROWS, ShardReader
from mltrain.text import shortened

LITE_FILE = "gallery.db"  # Milvus Lite's database folder inside the bundle
IN_BUNDLE_COLLECTION = "gallery"
INSTALL = "pip install -e '.[milvus]'"
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX")
ARGS = ("uri", "collection", "index_type")
INSERT_ROWS = 1000  # rows per insert call: well under gRPC's 64 MB message limit at 1280-d
MAX_PATH = 4096
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
GENERATED = re.compile(r"mltrain_\w*_\d+")  # `_new_name`'s collections: an export may drop them
METRICS = {"cosine": "IP", "l2": "L2"}
_REMOTE = ("http://", "https://", "tcp://", "grpc://", "unix:")
_lite_users: dict[str, int] = {}  # Lite folder -> open galleries in this process
_lite_lock = threading.Lock()


def _client_class() -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ConfigError(f"export.index milvus needs pymilvus, which is not installed; "
                          f"{INSTALL}") from None  # fmt: skip
    return MilvusClient


def is_remote(uri: str) -> bool:
    """A Milvus server (by URL), rather than a Milvus Lite folder."""
    return uri.startswith(_REMOTE)


def _in_bundle(uri: str | None) -> bool:
    return uri in (None, LITE_FILE, f"./{LITE_FILE}")


def _client(uri: str, where: str) -> Any:
    """A client for `uri` that has answered once; the client library's own error if not."""
    client_cls = _client_class()
    for name in ("pymilvus", "milvus_lite", "grpc"):  # their tracebacks become our one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if not is_remote(uri):
        _need_lite(uri, where)
    client = client_cls(uri=uri, timeout=10) if is_remote(uri) else client_cls(uri=uri)
    client.list_collections()
    return client


def _connect(uri: str, where: str) -> Any:
    """A client for `uri`, or one line naming it and the fix."""
    try:
        client = _client(uri, where)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - pymilvus raises many types for one failure
        why = _why(e)
        if not is_remote(uri):  # Milvus Lite: one process at a time holds the folder's lock
            raise BundleError(f"{where}: Milvus Lite at {uri} could not be opened ({why}); "
                              "another process (mltrain serve?) may hold it: stop that one, or "
                              "export to a Milvus server (export.index_args.uri)") from None
        raise BundleError(f"{where}: Milvus at {uri} is unreachable ({why}); start it or fix "
                          "export.index_args.uri") from None
    return client


def _why(e: BaseException) -> str:
    """The last line of a client error, short (pymilvus messages span many lines)."""
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def _need_lite(uri: str, where: str) -> None:
    try:
        import milvus_lite  # noqa: F401 - pymilvus opens .db folders through it
    except ImportError:
        raise ConfigError(f"{where}: Milvus Lite ({uri}) needs milvus-lite, which is not "
                          f"installed; {INSTALL}") from None  # fmt: skip


def _check_args(args: Any) -> dict[str, Any]:
    args = dict(args or {})
    bad = sorted(str(a) for a in args if a not in ARGS)
    if bad:
        raise ConfigError(f"export.index_args: milvus takes {', '.join(ARGS)} (got "
                          f"{', '.join(bad)})")  # fmt: skip
    uri = args.get("uri")
    if uri is not None:
        if not isinstance(uri, str) or not uri:
            raise ConfigError(f"export.index_args.uri {uri!r} is not a URI; give "
                              "http://host:19530 or an absolute path to a .db folder")
        if uri.startswith("milvus:"):
            uri = args["uri"] = uri[len("milvus:"):]  # fmt: skip
        if not (_in_bundle(uri) or is_remote(uri) or (os.path.isabs(uri) and uri.endswith(".db"))):
            raise ConfigError(f"export.index_args.uri {uri!r}: a Milvus Lite folder is "
                              f"{LITE_FILE} inside the bundle (leave uri unset) or an absolute "
                              "path ending in .db; a server is http://host:19530")  # fmt: skip
    collection = args.get("collection")
    if collection is not None and not (isinstance(collection, str) and NAME.fullmatch(collection)):
        raise ConfigError(f"export.index_args.collection {str(collection)[:40]!r} is not a "
                          "Milvus collection name (letters, digits, _; a letter first)")
    kind = args.get("index_type", "FLAT")
    if kind not in INDEX_TYPES:
        raise ConfigError(f"export.index_args.index_type {str(kind)[:40]!r} is not one of "
                          f"{', '.join(INDEX_TYPES)}")  # fmt: skip
    return args


def _row_count(client: Any, collection: str) -> int:
    res = client.query(collection, filter="", output_fields=["count(*)"])
    return int(res[0]["count(*)"])


def _collection_dim(client: Any, collection: str) -> int | None:
    for f in client.describe_collection(collection)["fields"]:
        if f["name"] == "vector":
            return int(f["params"]["dim"])
    return None


class MilvusGallery:
    """A Milvus collection holding the bundle's vectors, classes and paths."""

    backend = "milvus"
    FILES: tuple[str, ...] = ()  # a database folder changes as it is opened: not hashed
    NAMES = (LITE_FILE,)

    def __init__(self, client: Any, uri: str, collection: str, dim: int, metric: str,
                 count: int, index_type: str, lite: Path | None) -> None:  # fmt: skip
        self.client, self.uri, self.collection = client, uri, collection
        self._dim, self.metric, self._count = dim, metric, count
        self.index_type = index_type
        self._lite = lite  # the Lite folder this gallery opened, if any (released on close)

    @property
    def dim(self) -> int:
        return self._dim

    def count(self) -> int:
        return self._count

    def check_metric(self, metric: str) -> None:
        if metric != self.metric:
            raise ConfigError(f"metric '{metric}' does not match this Milvus collection "
                              f"({self.metric})")  # fmt: skip

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        where = f"id < {self._count}"
        try:
            found = self.client.search(self.collection, data=[q.tolist() for q in queries],
                                       limit=int(k), filter=where, output_fields=[],
                                       search_params={"metric_type": METRICS[self.metric]})
        except Exception as e:  # noqa: BLE001 - pymilvus raises many types for one failure
            raise BundleError(f"Milvus search in collection {self.collection} at {self.uri} "
                              f"failed ({_why(e)}); is the server up?") from None  # fmt: skip
        scores = np.full((len(queries), k), np.nan, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        for i, hits in enumerate(found):
            for j, hit in enumerate(hits[:k]):
                scores[i, j], rows[i, j] = hit["distance"], hit["id"]
        return scores, rows

    def add(self, vectors: np.ndarray, labels: Sequence[int], paths: Sequence[str]) -> None:
        _upsert(self.client, self.collection, self._count, vectors, labels, paths)
        self._count += len(vectors)

    def save(self, folder: Path) -> list[str]:
        """A Lite folder inside the bundle is copied into `folder`, closed first (its files
        are only complete then); a server's collection stays where it is."""
        if self._lite is not None and self._lite.parent.resolve() != folder.resolve():
            self.close()
            shutil.copytree(self._lite, folder / LITE_FILE, symlinks=True,
                            ignore=shutil.ignore_patterns("LOCK"))  # fmt: skip
        return []

    def describe(self, folder: Path) -> dict[str, Any]:
        lite = folder / LITE_FILE
        size = sum(p.stat().st_size for p in lite.rglob("*") if p.is_file()) if lite.is_dir() else 0
        return {"backend": self.backend, "uri": self.uri, "collection": self.collection,
                "index_type": self.index_type, "ntotal": self._count, "bytes": size}  # fmt: skip

    def close(self) -> None:
        if self.client is None:
            return
        self.client.close()
        self.client = None
        if self._lite is not None:
            _release_lite(self._lite)

    # --- backend class methods ------------------------------------------------------------

    @classmethod
    def check(cls, kind: str, args: Any, rows: int, n_train: int, dim: int, metric: str,
              pca_dim: int | None) -> str | None:  # fmt: skip
        """Arguments, the client library and a server are checked before any embedding."""
        args = _check_args(args)
        if pca_dim is not None:
            raise ConfigError("export.pca_dim applies to Faiss indexes; Milvus stores full-"
                              "length vectors: leave pca_dim unset for export.index milvus")
        _client_class()
        uri = args.get("uri")
        if _in_bundle(uri):
            _need_lite(LITE_FILE, "export.index milvus")
        else:
            client = _connect(uri, "export.index milvus")
            try:
                if args.get("collection"):
                    _refuse_existing(client, uri, args["collection"], dim)
            finally:
                client.close()
        return None

    @classmethod
    def build(cls, kind: str, args: Any, pca_dim: int | None, metric: str,
              source: np.ndarray | ShardReader, labels: Sequence[int], paths: Sequence[str],
              folder: Path, target: Path) -> MilvusGallery:  # fmt: skip
        args = _check_args(args)
        dim = int(source.shape[1])
        uri = args.get("uri")
        lite = None
        if _in_bundle(uri):
            uri, lite = LITE_FILE, folder / LITE_FILE
            collection = IN_BUNDLE_COLLECTION
            client = _open_lite(lite, "export.index milvus")
        else:
            collection = args.get("collection") or _new_name(target)
            client = _connect(uri, "export.index milvus")
            _refuse_existing(client, uri, collection, dim)
        index_type = args.get("index_type", "FLAT")
        gallery = cls(client, uri, collection, dim, metric, 0, index_type, lite)
        try:
            _create(client, collection, dim, metric, index_type)
            for start, chunk in _chunks(source):
                rows = prepare(np.asarray(chunk, np.float32), metric, "vectors")
                gallery.add(rows, labels[start : start + len(rows)],
                            paths[start : start + len(rows)])  # fmt: skip
        except BaseException:
            if lite is None:  # a half-filled server collection serves no bundle
                _drop_quietly(client, collection)
            gallery.close()
            raise
        if lite is not None:
            gallery.close()  # complete on disk before the staging folder is moved
        return gallery

    @classmethod
    def open(cls, folder: Path, manifest: dict[str, Any], metadata: list[dict]) -> MilvusGallery:
        info = manifest["index"]
        uri, collection = info.get("uri"), info.get("collection")
        where = f"{folder / 'manifest.json'}"
        if not isinstance(uri, str) or not isinstance(collection, str) or not NAME.fullmatch(
            collection
        ):
            raise BundleError(f"{where}: index.uri and index.collection must name the Milvus "
                              "collection; re-export the bundle")  # fmt: skip
        metric, count, dim = manifest["metric"], manifest["count"], manifest["embedding_dim"]
        if metric not in METRICS:
            raise BundleError(f"{where}: metric {metric!r} is not cosine or l2")
        lite = None
        if _in_bundle(uri):
            lite = folder / LITE_FILE
            if lite.is_symlink() or not lite.is_dir():
                raise BundleError(f"{lite} is missing or not a folder inside the bundle; this "
                                  "bundle keeps its gallery there: re-export it")  # fmt: skip
            client = _open_lite(lite, f"search bundle {folder}")
        elif is_remote(uri) or (os.path.isabs(uri) and uri.endswith(".db")):
            if not is_remote(uri) and not os.path.isdir(uri):  # never create one by opening it
                raise BundleError(f"Milvus Lite folder {uri} that {where} names does not exist; "
                                  "put it back, or re-export the bundle")  # fmt: skip
            client = _connect(uri, f"search bundle {folder}")
        else:
            raise BundleError(f"{where}: index.uri {uri[:80]!r} is neither {LITE_FILE}, an "
                              "absolute path nor a server URL; re-export the bundle")
        gallery = cls(client, uri, collection, dim, metric, count,
                      str(info.get("index_type", "FLAT")), lite)  # fmt: skip
        try:
            _check_collection(client, uri, collection, dim, count)
        except BaseException:
            gallery.close()
            raise
        return gallery


    @classmethod
    def retire(cls, old: dict[str, Any], new: dict[str, Any]) -> str | None:
        """After an export swapped its bundle in over one whose manifest index was `old`:
        drop the replaced bundle's collection where it sits outside the bundle (a server, a
        shared Lite folder), mltrain named it (`_new_name`; never a user-named
        `export.index_args.collection`) and the new bundle (index `new`) does not use it.
        Returns the line to print: what was dropped, or a note that it was left and how to
        drop it (never raises); None when there is nothing to drop."""
        uri, name = old.get("uri"), old.get("collection")
        if (not isinstance(uri, str) or not isinstance(name, str) or _in_bundle(uri)
                or not GENERATED.fullmatch(name) or (old.get("args") or {}).get("collection")
                or (new.get("backend"), new.get("uri"), new.get("collection"))
                == (cls.backend, uri, name)):  # fmt: skip
            return None
        if not is_remote(uri) and not (os.path.isabs(uri) and os.path.isdir(uri)):
            return None  # a Lite folder that is gone (or never was one) holds nothing
        try:
            client = _client(uri, "the replaced bundle's gallery")
            try:
                if not client.has_collection(name):
                    return None  # dropped already
                client.drop_collection(name)
            finally:
                client.close()
        except Exception as e:  # noqa: BLE001 - the export is done: one note, never a failure
            return (f"note: the replaced bundle's Milvus collection {name} at {uri} was left "
                    f"({shortened(_why(e), 160)}); drop it when no bundle names it: python -c "
                    f"\"from pymilvus import MilvusClient; MilvusClient('{uri}')"
                    f".drop_collection('{name}')\"")  # fmt: skip
        return f"dropped Milvus collection {name} at {uri} (the replaced bundle's gallery)"


def _open_lite(path: Path, where: str) -> Any:
    key = str(path.resolve())
    client = _connect(str(path), where)
    with _lite_lock:
        _lite_users[key] = _lite_users.get(key, 0) + 1
    return client


def _release_lite(path: Path) -> None:
    """Stop this process's Lite server for `path` when its last gallery closes, so the folder
    is complete and unlocked (a closed client alone leaves it running)."""
    key = str(path.resolve())
    with _lite_lock:
        left = _lite_users.get(key, 1) - 1
        if left > 0:
            _lite_users[key] = left
            return
        _lite_users.pop(key, None)
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(str(path))


def _new_name(target: Path) -> str:
    """A collection of this export's own (`mltrain_<bundle>_<time>`), so the bundle it replaces
    keeps its collection until the swap."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", target.name)[:80] or "bundle"
    return f"mltrain_{stem}_{time.time_ns() // 1000}"


def _refuse_existing(client: Any, uri: str, collection: str, dim: int) -> None:
    if not client.has_collection(collection):
        return
    held = _collection_dim(client, collection)
    if held != dim:
        raise ConfigError(f"Milvus collection {collection} at {uri} holds {held}-d vectors, this "
                          f"model gives {dim}-d; name another export.index_args.collection or "
                          "drop that one")  # fmt: skip
    raise ConfigError(f"Milvus collection {collection} at {uri} already exists (another "
                      "bundle's gallery); name a new export.index_args.collection, or leave it "
                      "unset for a fresh one")  # fmt: skip


def _create(client: Any, collection: str, dim: int, metric: str, index_type: str) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("label", DataType.INT64)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type=index_type, metric_type=METRICS[metric])
    client.create_collection(collection, schema=schema, index_params=params,
                             consistency_level="Strong")  # a search sees every insert  # fmt: skip


def _upsert(client: Any, collection: str, first: int, vectors: np.ndarray,
            labels: Sequence[int], paths: Sequence[str]) -> None:  # fmt: skip
    """Rows first, first + 1, ...; upserted, so an interrupted add that is repeated writes
    the same ids again rather than twice."""
    for s in range(0, len(vectors), INSERT_ROWS):
        batch = [{"id": first + i, "vector": vectors[i].tolist(), "label": int(labels[i]),
                  "path": str(paths[i])[:MAX_PATH]}
                 for i in range(s, min(s + INSERT_ROWS, len(vectors)))]  # fmt: skip
        client.upsert(collection, batch)


def _chunks(source: np.ndarray | ShardReader):
    if isinstance(source, ShardReader):
        yield from source.chunks(CHUNK_ROWS)
        return
    for start in range(0, len(source), CHUNK_ROWS):
        yield start, source[start : start + CHUNK_ROWS]


def _check_collection(client: Any, uri: str, collection: str, dim: int, count: int) -> None:
    """The collection the manifest names holds this bundle: its length and at least its rows
    (more are an interrupted add's, which searches filter out)."""
    if not client.has_collection(collection):
        raise BundleError(f"Milvus collection {collection} at {uri} does not exist (dropped?); "
                          "re-export the bundle")  # fmt: skip
    client.load_collection(collection)  # a reopened collection starts released
    held = _collection_dim(client, collection)
    if held != dim:
        raise BundleError(f"Milvus collection {collection} at {uri} holds {held}-d vectors, the "
                          f"bundle's model gives {dim}-d; re-export the bundle")  # fmt: skip
    rows = _row_count(client, collection)
    if rows < count:
        raise BundleError(f"Milvus collection {collection} at {uri} holds {rows} vectors but "
                          f"manifest.json says {count}; re-export the bundle")  # fmt: skip


def _drop_quietly(client: Any, collection: str) -> None:
    try:
        client.drop_collection(collection)
    except Exception:  # noqa: BLE001,S110 - the failure being reported matters more
        pass
