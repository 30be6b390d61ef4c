"""A bundle kept in memory to answer uploaded images: the core of `mltrain serve`, free of
any web framework so it can be tested and reused without one.

The bundle is loaded and its model built once. Every upload is decoded in its caller's
thread (Pillow releases the GIL), then handed to one embedding thread, the micro-batcher:
it takes the first waiting image, waits a few milliseconds for more and embeds up to
`max_batch` of them in one model call. On CPU one call on 8 images costs far less than 8
calls on one, so concurrent clients share the model's time instead of queueing behind each
other, and the model is only ever used by that one thread. The gallery (Faiss index or Milvus
collection) is searched under a lock; a flat search takes microseconds, so the lock is never
what a client waits for. Exact scoring (a class filter, an answer the index left short) runs
outside it, on the stored embeddings.

Results are ranked by `mltrain.retrieval.search.rank_hits`, the command line's own code, so
an image searched here and with `mltrain search` gets the same hits and scores. Files are
only ever reached through a row id and `safe_image_path`: nothing in a request names a path.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mltrain.data.images import DEFAULT_MAX_PIXELS, decode_image_bytes
from mltrain.data.pipeline import decode_size
from mltrain.errors import BundleError, ConfigError, DataError, MltrainError, check_number
from mltrain.inference.embedder import Embedder
from mltrain.retrieval.bundle import Bundle, load_bundle, safe_image_path
from mltrain.retrieval.bundle_model import bundle_embedder
from mltrain.retrieval.gallery import label_of
from mltrain.retrieval.index import prepare
from mltrain.retrieval.rerank import RERANKERS
from mltrain.retrieval.search import (
    QueryResult,
    SearchRun,
    apply_threshold,
    default_rerank,
    gallery_search,
    hit_dict,
    rank_hits,
    search_depth,
    threshold_value,
)
from mltrain.retrieval.sheet import thumbnail as thumbnail_image
from mltrain.retrieval.verify import DEFAULT_FAR, is_resolved, pair_verdict, threshold_for

DEFAULT_MAX_UPLOAD = 20 * 2**20  # bytes: a large camera JPEG is under 15 MB
RESULT_TIMEOUT_S = 300  # an embedding that takes longer is a hung model: fail the request
MAX_K = 1000  # hits per answer; more is a data dump, not a search


class UploadTooLarge(DataError):
    """An upload over the byte limit (refused before decoding)."""


class NotFound(MltrainError):
    """A thumbnail id that names no row of the bundle, or whose image is missing."""


class MicroBatcher:
    """One worker thread that applies `fn` (a list of items -> an array, one row per item)
    to whatever arrived together: the first waiting item plus any that come within `wait_s`,
    up to `max_batch`. Each `submit` gets its own future.

    `sizes` counts the batches run by size: how much batching actually happened."""

    def __init__(self, fn: Callable[[list], np.ndarray], max_batch: int = 16,
                 wait_s: float = 0.005) -> None:  # fmt: skip
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_s
        self.sizes: Counter[int] = Counter()
        self._sizes_lock = threading.Lock()  # health() reads while the worker counts
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._submit_lock = threading.Lock()  # no item slips in behind close()'s sentinel
        self._thread = threading.Thread(target=self._loop, name="mltrain-embed", daemon=True)
        self._thread.start()

    def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size have run so far (a copy)."""
        with self._sizes_lock:
            return dict(sorted(self.sizes.items()))

    def submit(self, item: Any) -> Future:
        fut: Future = Future()
        with self._submit_lock:
            if self._closed:
                raise MltrainError("the embedding thread has stopped; restart the server")
            self._queue.put((item, fut))
        return fut

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        with self._submit_lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
        """The batch that starts with `first`, and whether close() was asked meanwhile."""
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        try:
            while (first := self._queue.get()) is not None:
                batch, stop = self._collect(first)
                self._run([item for item, _ in batch], [fut for _, fut in batch])
                if stop:
                    return
        finally:  # however the thread ends, nobody waits on it for ever
            with self._submit_lock:
                self._closed = True
            while True:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is not None and not entry[1].done():
                    entry[1].set_exception(MltrainError("the embedding thread stopped; "
                                                        "restart the server"))  # fmt: skip

    def _run(self, items: list, futures: list[Future]) -> None:
        with self._sizes_lock:
            self.sizes[len(items)] += 1
        try:
            out = self.fn(items)
            if len(out) != len(items):
                raise RuntimeError(f"{len(out)} embeddings for {len(items)} images")
        except Exception as e:  # noqa: BLE001 - whatever it is, it reaches its request
            if len(items) == 1:
                futures[0].set_exception(e)
                return
            for item, fut in zip(items, futures, strict=True):  # one bad image fails alone
                self._run([item], [fut])
            return
        for row, fut in zip(out, futures, strict=True):
            fut.set_result(row)


class SearchService:
    """Search and verification over one bundle for uploaded image bytes.

    `embedder_factory` builds the embedder from the loaded bundle (default: `bundle_embedder`,
    which runs model.onnx where the bundle has one, else PyTorch); the service only needs its
    `embed_arrays` and `dcfg`. Limits: `max_upload_bytes` per image, `max_pixels` per decoded image.
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
        image_root: str | Path | None = None,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch: int = 16,
        batch_wait_ms: float = 5.0,
        embedder_factory: Callable[[Bundle], Embedder] = bundle_embedder,
    ) -> None:
        self._owns_bundle = not isinstance(bundle, Bundle)  # its gallery is ours to close
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, image_root)
        self.bundle.gallery.check_metric(self.bundle.metric)
        self.embedder = embedder_factory(self.bundle)
        self.max_upload_bytes, self.max_pixels = int(max_upload_bytes), int(max_pixels)
        self._size_hint = decode_size(self.embedder.dcfg)
        side = self._size_hint or 224
        if self.max_pixels < side * side:  # even a square upload is resized to side x side
            raise ConfigError(f"--max-pixels {self.max_pixels:g} is below what the model reads "
                              f"({side}x{side} = {side * side / 1e6:.3g} MP), so every upload "
                              "would be refused; raise it")  # fmt: skip
        # A model that cannot run (an ONNX graph this onnxruntime cannot load) fails here, at
        # start-up, not at the first request; and that request does not pay the warm-up.
        self.embedder.embed_arrays([np.zeros((side, side, 3), np.uint8)])
        self._index_lock = threading.Lock()
        # Decoding runs in the request threads: at most one per core at a time, so 40 waiting
        # uploads of 40 MP do not all sit decoded in memory at once.
        self._decoding = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
        self.batcher = MicroBatcher(self.embedder.embed_arrays, max_batch, batch_wait_ms / 1e3)
        self.calibration = _default_calibration(self.bundle)
        self.thumbnail_jpeg = lru_cache(maxsize=1024)(self._thumbnail_jpeg)

    @property
    def calibrated(self) -> float | None:
        """The bundle's threshold at the default FAR, or None (an l2 or uncalibrated bundle)."""
        return None if self.calibration is None else self.calibration["threshold"]

    def close(self) -> None:
        self.batcher.close()
        if self._owns_bundle:
            self.bundle.gallery.close()  # a Milvus Lite folder is unlocked for other commands

    # --- requests --------------------------------------------------------------------------

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """The upload `name` as RGB, or a DataError naming it and the limit it broke."""
        if len(data) > self.max_upload_bytes:
            # `data` stops one byte past the limit when read from a request: no size to quote
            raise UploadTooLarge(f"{name} is over the {self.max_upload_bytes / 2**20:g} MB "
                                 "upload limit; send a smaller image")  # fmt: skip
        with self._decoding:
            return decode_image_bytes(data, name, self.max_pixels, self._size_hint)

    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Embeddings of decoded images, each through the micro-batcher (batched with whatever
        other requests are waiting)."""
        futures = [self.batcher.submit(image) for image in images]
        return [f.result(timeout=RESULT_TIMEOUT_S) for f in futures]

    def search(self, image: bytes, k: int | None = None, rerank: str = "auto",
               threshold: str | None = None, name: str = "image",
               class_name: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Top-k hits for an uploaded image: {"results", "k", "rerank", "threshold",
        "threshold_resolved", "answer", "embed_ms", "search_ms"}; `threshold` None means the
        bundle's calibrated one where it has one, "none" none, "auto" or a number as
        `mltrain search`. `threshold_resolved` comes with a calibrated threshold: false when
        too few impostor pairs backed it to resolve its FAR (it is approximate). `class_name`
        limits the hits to that class."""
        k, rerank, cut, cal = self._search_args(k, rerank, threshold)
        label = label_of(self.bundle.classes, class_name or None)
        pixels = self.decode(image, name)
        t0 = time.perf_counter()
        (emb,) = self.embed([pixels])
        t1 = time.perf_counter()
        query = prepare(emb[None, :], self.bundle.metric, "query")
        depth = search_depth(self.bundle, k, rerank)
        scores, rows = gallery_search(self.bundle, query, depth, label, self._index_lock)
        run = SearchRun([QueryResult(name)], k, 0.0, 0.0, rerank)
        run.results[0].hits = rank_hits(self.bundle, query[0], scores[0], rows[0], k, rerank)
        if cut is not None:
            apply_threshold(run, cut)
        t2 = time.perf_counter()
        doc: dict[str, Any] = {
            "results": [_hit_json(h) for h in run.results[0].hits],
            "k": k,
            "rerank": rerank,
            "embed_ms": (t1 - t0) * 1e3,
            "search_ms": (t2 - t1) * 1e3,
        }
        if cut is not None:
            doc["threshold"], doc["answer"] = cut, run.results[0].answer
        if cal is not None:
            doc["threshold_resolved"] = is_resolved(cal)
        return doc

    def verify(self, a: bytes, b: bytes, far: str | None = None) -> dict[str, Any]:
        """Are the two uploads the same class at the bundle's calibrated threshold (at `far`,
        one of the calibrated false-accept rates, else the default 1e-3)?"""
        try:
            rate = DEFAULT_FAR if far in (None, "") else float(far)
        except ValueError:
            raise ConfigError(f"far must be a number such as 1e-3, got {far[:40]!r}") from None
        check_number("far", rate, 0, 1, low_open=True, high_open=True,
                     what="a false-accept rate, e.g. 1e-3")  # fmt: skip
        cal = threshold_for(self.bundle.manifest, rate, "far")  # before any work
        pixels = [self.decode(a, "image a"), self.decode(b, "image b")]
        score, same = pair_verdict(np.stack(self.embed(pixels)), self.bundle.metric, cal)
        return {"score": score, "threshold": float(cal["threshold"]), "same": same,
                "far": float(cal["far"]), "threshold_resolved": is_resolved(cal)}  # fmt: skip

    def _thumbnail_jpeg(self, row: int) -> bytes:
        meta = self.bundle.metadata[row]
        try:
            path = safe_image_path(self.bundle, meta["path"])
        except BundleError:  # its message names server paths: none goes to a client
            raise BundleError(f"the image of row {row} lies outside the bundle's image root; "
                              "refusing to send it") from None  # fmt: skip
        img = thumbnail_image(path)
        if img is None:
            raise NotFound(f"the image of row {row} is missing or unreadable on this server")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def thumbnail(self, row_text: str) -> bytes:
        """JPEG thumbnail of bundle row `row_text` (decimal digits only, in range)."""
        if not (row_text.isascii() and row_text.isdigit()) or len(row_text) > 12:
            raise NotFound(f"thumbnail id {row_text[:40]!r} is not a row number")
        row = int(row_text)
        if row >= len(self.bundle):
            raise NotFound(f"thumbnail id {row} is out of range (the bundle has "
                           f"{len(self.bundle)} images)")  # fmt: skip
        return self.thumbnail_jpeg(row)

    def health(self) -> dict[str, Any]:
        manifest, cal = self.bundle.manifest, self.calibration
        return {
            "status": "ok",
            "images": len(self.bundle),
            "classes": len(self.bundle.classes),
            "model": manifest["config"].get("model", {}).get("backbone"),
            "dim": manifest["embedding_dim"],
            "metric": self.bundle.metric,
            "threshold": self.calibrated,
            "threshold_resolved": None if cal is None else is_resolved(cal),
            "batches": self.batcher.batch_sizes(),
        }

    # --- arguments -------------------------------------------------------------------------

    def _search_args(self, k: int | None, rerank: str, threshold: str | None):
        """(k, re-ranker, threshold or None, the calibration it came from or None)."""
        if k is None:
            k = int(self.bundle.manifest["config"]["export"]["k"])
        if not 1 <= k <= MAX_K:
            raise ConfigError(f"k must be between 1 and {MAX_K}, got {k}")
        k = min(k, len(self.bundle))
        if rerank not in ("auto", *RERANKERS):
            raise ConfigError(f"rerank must be auto or one of {', '.join(RERANKERS)}, "
                              f"got {rerank[:40]!r}")  # fmt: skip
        rerank = default_rerank(self.bundle, rerank)
        if threshold is None:
            return k, rerank, self.calibrated, self.calibration
        if threshold in ("none", ""):
            return k, rerank, None, None
        cut, cal = threshold_value(self.bundle, threshold, "threshold", "auto, none")
        return k, rerank, cut, cal


def _default_calibration(bundle: Bundle) -> dict[str, Any] | None:
    """The bundle's calibration at the default FAR with its threshold as a float, or None
    (an l2 or uncalibrated bundle)."""
    if bundle.metric != "cosine":
        return None
    try:
        cal = threshold_for(bundle.manifest)
        return {**cal, "threshold": float(cal["threshold"])}
    except (BundleError, ConfigError, TypeError, ValueError):
        return None


def _hit_json(h) -> dict[str, Any]:
    d = hit_dict(h)
    d["id"] = d.pop("row")
    d["thumb"] = f"/thumb/{d['id']}"
    if d["match"] is None:
        del d["match"]
    return d


__all__ = ["MicroBatcher", "NotFound", "SearchService", "UploadTooLarge"]
