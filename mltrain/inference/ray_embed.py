"""Embedding an image list with a pool of Ray actors, on one machine or a Ray cluster.

`ray_embedder` connects to Ray (or starts a small local Ray) and yields a `RayEmbedder`: an
`Embedder` whose `embed` and `embed_batches` send the paths through a Ray dataset to a pool
of actors. Everything else an export or an add does (shards, metadata, manifest, index) runs
in this process on the streamed result, so a bundle written this way has the layout and,
row for row, the embeddings of a single-process one.

Each actor rebuilds the model once from the weights this process sends through the object
store (nothing is downloaded on the workers), then decodes and embeds whole batches with the
same dataset, transform, chunks and precision as `Embedder.embed`. Rows come back in path
order (Ray Data's `preserve_order`), checked as they arrive. On a cluster every node needs
the same mltrain installed and the images at the same absolute paths (a shared file system).

Failures are one line: Ray missing, an unreachable address, an unreadable image (the actor
returns the loader's message rather than crash, so it names the file as a plain export does),
or an actor that died (the last line of its error and where Ray keeps its logs).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from mltrain.errors import ConfigError, DataError, MltrainError
from mltrain.inference.embedder import Embedder
from mltrain.progress import progress
from mltrain.runtime import usable_cpus
from mltrain.text import counted, shortened

RAY_EXTRA = "pip install -e '.[ray]'"
LOCAL_OBJECT_STORE = 256 * 2**20  # rows of paths and embeddings only; the minimum is 75 MiB
CONNECT_TIMEOUT_S = 5.0  # Ray Client would retry for 30 s before saying anything
MAX_BLOCKS = 2000  # input blocks of a dataset: a gallery of millions gets blocks of batches
GPU_THREADS = 4  # decoding threads of an actor that feeds a GPU
# An actor's start (a new process importing torch, the model built) costs about what it takes
# to embed 4 batches on a CPU core, so the default pool has at most one actor per 4 batches.
MIN_BATCHES_PER_ACTOR = 4


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `address` None starts a local Ray on this machine; `auto`, a
    `host:port` or `ray://host:10001` joins a running cluster. `actors` None sizes the pool
    to the cluster (CPUs / `threads`, or GPUs / `gpus`); `gpus` None means one per actor when
    this process's model runs on CUDA, else none."""

    address: str | None = None
    actors: int | None = None
    threads: int | None = None
    gpus: float | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors {self.actors}: give at least 1 actor")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--ray-threads {self.threads}: give at least 1 thread per actor")
        if self.gpus is not None and not 0 <= self.gpus <= 64:
            raise ConfigError(f"--ray-gpus {self.gpus:g}: give GPUs per actor, from 0 to 64 "
                              "(0.5: two actors share a GPU)")


def require_ray() -> Any:
    """The `ray` module with Ray Data, or a one-line ConfigError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra, not only the core
    except ImportError as e:
        raise ConfigError(f"--ray needs Ray Data, which is not installed ({e.name or e}); "
                          f"install it with {RAY_EXTRA}") from None  # fmt: skip
    return ray


def check_reachable(address: str) -> None:
    """A TCP connect to a `ray://host:port` or `host:port` address, so a wrong one is named at
    once (Ray itself retries for half a minute); `auto` is left to Ray."""
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ConfigError(f"--ray {address}: not a Ray address; give auto, host:6379 or "
                          "ray://host:10001 (a bare --ray takes the next argument as its "
                          "address: put it last)")  # fmt: skip
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(
            f"--ray {address}: cannot reach the Ray cluster ({e.strerror or e}); start it there "
            "with `ray start --head`, check the host and port, or give --ray without an "
            "address to run Ray on this machine"
        ) from None


@contextlib.contextmanager
def ray_runtime(address: str | None = None) -> Iterator[Any]:
    """Ray connected for the body: a running cluster at `address`, else a new local Ray sized
    to this process's CPUs with a small object store, no dashboard and workers' output kept
    out of the terminal. A Ray this process already runs is used as it is and left running."""
    ray = require_ray()
    if address is not None:
        check_reachable(address)
    started = not ray.is_initialized()
    if started:
        _init(ray, address)
    try:
        with _quiet_ordered_data():
            yield ray
    finally:
        if started:
            ray.shutdown()


def _init(ray: Any, address: str | None) -> None:
    """`ray.init`, keeping this process's SIGTERM handler: Ray's would exit at once, where
    the commands' handler stops as Ctrl-C does (`mltrain.commands.common.term_as_interrupt`)."""
    local = {"num_cpus": usable_cpus(), "object_store_memory": LOCAL_OBJECT_STORE}
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, **({} if address else local))  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ConfigError(f"--ray: cannot start or join {where} ({_last_line(e)}); check "
                          "`ray status` there, or run without --ray") from None  # fmt: skip
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def _quiet_ordered_data() -> Iterator[None]:
    """Ray Data for the body: rows in input order, its progress bars, start lines and error
    tracebacks off (the export has its own progress line, and a failure becomes one line
    of ours that points at the logs)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.enable_progress_bars,
              ctx.print_on_execution_start)  # fmt: skip
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    ctx.execution_options.preserve_order = True  # rows must come back in path order
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars,
         ctx.print_on_execution_start) = before  # fmt: skip
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@dataclass
class RayEmbedder(Embedder):
    """An `Embedder` that embeds path lists on Ray actors (see the module docstring). Made
    by `ray_embedder`, valid while its Ray connection is."""

    options: RayOptions = field(default_factory=RayOptions)
    weights: Any = field(default=None, repr=False)  # object ref of the model's state dict

    def embed(
        self, paths: list[Path], labels: np.ndarray | None = None, desc: str = "embedding"
    ) -> np.ndarray:
        parts = list(self.embed_batches(paths, labels, desc))
        if not parts:
            raise DataError("nothing to embed: the image list is empty")
        return np.concatenate(parts)

    def embed_batches(
        self, paths: list[Path], labels: np.ndarray | None = None, desc: str = "embedding"
    ) -> Iterator[np.ndarray]:
        """Embeddings (float32) in `paths` order, one actor batch at a time."""
        import ray

        if not paths:
            return
        ds, blocks = self._dataset(paths)
        expected = 0
        try:
            for out in progress(ds.iter_batches(batch_size=None, batch_format="numpy"),
                                desc=desc, total=blocks):  # fmt: skip
                expected = _checked_rows(out, expected)
                yield np.asarray(out["embedding"], dtype=np.float32)
        except ray.exceptions.RayError as e:
            raise MltrainError(
                f"a Ray embedding actor failed ({_last_line(e)}); see the worker logs "
                "under /tmp/ray/session_latest/logs on its node"
            ) from None
        if expected != len(paths):
            raise MltrainError(f"Ray returned {expected} of {len(paths)} embeddings")

    def _dataset(self, paths: list[Path]) -> tuple[Any, int]:
        """The Ray dataset of (row, path) blocks mapped through the actor pool, and its block
        count (one output block per input block)."""
        import pyarrow as pa
        import ray.data

        n, batch = len(paths), self.cfg.eval.batch_size
        rows = batch * max(1, math.ceil(n / (batch * MAX_BLOCKS)))
        table = pa.table({"row": np.arange(n, dtype=np.int64),
                          "path": [str(Path(p).absolute()) for p in paths]})  # fmt: skip
        blocks = [table.slice(s, rows) for s in range(0, n, rows)]
        # Unasked, a few batches get fewer actors: starting one costs batches' worth of time
        per_actor = 1 if self.options.actors else MIN_BATCHES_PER_ACTOR
        actors = min(self.pool_size(), math.ceil(len(blocks) / per_actor))
        with warnings.catch_warnings():  # max_restarts is named in no other way yet
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = self._mapped(ray.data.from_arrow(blocks), actors)
        return ds, len(blocks)

    def _mapped(self, ds: Any, actors: int) -> Any:
        import ray.data

        gpus, threads = self.gpus_per_actor, self.threads
        return ds.map_batches(
            _EmbedActor,
            fn_constructor_kwargs={
                "cfg": self.cfg, "num_classes": _num_classes(self), "weights": self.weights,
                "threads": threads, "device": "cuda" if gpus else "cpu",
            },
            batch_size=None,  # one block is one batch
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
            num_gpus=gpus,
            max_restarts=0,  # a crash is reported, not retried on the same image for ever
        )  # fmt: skip

    @property
    def gpus_per_actor(self) -> float:
        if self.options.gpus is not None:
            return float(self.options.gpus)
        return 1.0 if self.device.type == "cuda" else 0.0

    @property
    def threads(self) -> int:
        """CPU threads per actor: 1 on CPU (one per core is fastest, see
        `mltrain.inference.batching`), `GPU_THREADS` decoders beside a GPU."""
        return self.options.threads or (GPU_THREADS if self.gpus_per_actor else 1)

    def pool_size(self) -> int:
        """`options.actors`, else as many as the cluster's CPUs (or GPUs) hold. A local Ray
        cannot grow, so a pool larger than it is refused rather than left waiting."""
        import ray

        gpus, threads = self.gpus_per_actor, self.threads
        have = ray.cluster_resources()
        cpus, gpus_there = int(have.get("CPU", 1)), float(have.get("GPU", 0))
        fits = int(gpus_there // gpus) if gpus else cpus // threads
        actors = self.options.actors or max(1, fits)
        if self.options.address is None and actors > fits:
            need = f"{gpus:g} GPU" if gpus else f"{threads} CPU"
            raise ConfigError(
                f"a pool of {counted(actors, 'Ray actor')} x {need} does not fit this machine's "
                f"Ray ({cpus} CPUs, {gpus_there:g} GPUs); give fewer with --ray-actors or "
                "--ray-threads (--ray-gpus 0 embeds on CPU), or join a cluster with --ray ADDRESS"
            )
        return actors


def _num_classes(embedder: Embedder) -> int:
    head = embedder.model.head
    return int(head.out_features) if head is not None else 0


def _checked_rows(out: dict[str, np.ndarray], expected: int) -> int:
    """Raise the image error an actor returned; check the rows are the next ones in order.
    Returns the next row expected."""
    errors = [str(e) for e in out["error"] if str(e)]
    if errors:
        raise DataError(errors[0])
    rows = np.asarray(out["row"])
    if not np.array_equal(rows, np.arange(expected, expected + len(rows))):
        raise MltrainError(f"Ray returned rows out of order (expected row {expected}, got "
                           f"{rows[0] if len(rows) else 'none'})")  # fmt: skip
    return expected + len(rows)


def _last_line(e: BaseException) -> str:
    """The message of a Ray error, whose text is a remote traceback: its last line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return shortened(lines[-1] if lines else type(e).__name__, 300)


class _EmbedActor:
    """One actor of the pool: builds the model once, then embeds one batch of paths a call,
    as `Embedder.embed` would (same dataset, transform, chunks, precision and flip)."""

    def __init__(self, cfg: Any, num_classes: int, weights: Any, threads: int,
                 device: str) -> None:  # fmt: skip
        import ray

        from mltrain.data.pipeline import decode_size
        from mltrain.data.transforms import eval_transform
        from mltrain.inference.embedder import make_embedder
        from mltrain.model.network import model_from_state

        torch.set_num_threads(threads)
        cfg = copy.deepcopy(cfg)
        cfg.train.device = device
        state = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
        model = model_from_state(cfg.model, num_classes, state, "the model sent to Ray")
        self.embedder = make_embedder(cfg, model)
        self.transform = eval_transform(self.embedder.dcfg)
        self.size = decode_size(self.embedder.dcfg)
        self.decoders = ThreadPoolExecutor(threads) if threads > 1 else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mltrain.inference.batching import embed_tensor

        n, dim = len(batch["row"]), self.embedder.embedding_dim
        try:
            x = self._tensors([str(p) for p in batch["path"]])
            emb, error = embed_tensor(self.embedder.forward_model, x, self.embedder.spec), ""
        except MltrainError as e:  # an unreadable image: the driver raises it, named
            emb, error = np.zeros((n, dim), np.float32), str(e)
        return {"row": batch["row"], "embedding": emb, "error": np.array([error] * n)}

    def _tensors(self, paths: list[str]) -> torch.Tensor:
        from mltrain.data.dataset import ImageDataset

        ds = ImageDataset(paths, np.zeros(len(paths), np.int64), self.transform, self.size)
        items = (self.decoders.map if self.decoders else map)(ds.__getitem__, range(len(ds)))
        return torch.stack([x for x, _, _ in items])


@contextlib.contextmanager
def ray_embedder(embedder: Embedder, options: RayOptions) -> Iterator[RayEmbedder]:
    """`embedder` running on Ray for the body (see the module docstring): Ray is joined or
    started first, so a wrong address or a missing Ray is said before anything is written."""
    if type(embedder) is not Embedder:
        raise ConfigError(f"--ray embeds with one model; a {type(embedder).__name__} cannot")
    with ray_runtime(options.address) as ray:
        state = {k: v.detach().cpu() for k, v in embedder.model.state_dict().items()}
        own = {f.name: getattr(embedder, f.name) for f in fields(Embedder) if f.init}
        pool = RayEmbedder(**own, options=options, weights=ray.put(state))
        pool.pool_size()  # a pool this Ray cannot hold is refused now
        if pool.gpus_per_actor == 0 and embedder.device.type == "cuda":
            print("note: --ray-gpus 0: the actors embed on CPU", file=sys.stderr)
        yield pool


def on_ray(embedder: Embedder, options: RayOptions | None) -> contextlib.AbstractContextManager:
    """`ray_embedder(embedder, options)`, or `embedder` itself when `options` is None: the one
    line a caller needs to embed either way."""
    return contextlib.nullcontext(embedder) if options is None else ray_embedder(embedder, options)
