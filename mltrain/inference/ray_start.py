"""Ray for the commands that embed on it (`mltrain.inference.ray_embed`): the pool flags as
`RayOptions`, Ray's presence and a cluster's address checked, Ray started or joined for a
body (`ray_runtime`), and the pool's actors (`PoolWorker`, `start_pool`, `pool_shape`).
Nothing here imports torch, so `ray_started_early` can start a local Ray (6-10 s on 2 cores)
and then the pool's actors while a command's imports of torch and the model's modules go on
beside them: an actor's own start, a process importing torch and timm, is then off the
critical path.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from mltrain.cpus import usable_cpus
from mltrain.errors import ConfigError
from mltrain.text import counted, shortened

RAY_EXTRA = "pip install -e '.[ray]'"
GPU_THREADS = 4  # decoding threads of an actor that feeds a GPU
# An actor's start (a new process importing torch, the model built) costs about what it takes
# to embed 4 batches on a CPU core, so a cluster's default pool has at most one actor per 4
# batches.
MIN_BATCHES_PER_ACTOR = 4
LOCAL_OBJECT_STORE = 256 * 2**20  # rows of paths and embeddings only; the minimum is 75 MiB
CONNECT_TIMEOUT_S = 5.0  # Ray Client would retry for 30 s before saying anything


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `address` None starts a local Ray on this machine; `auto`, a
    `host:port` or `ray://host:10001` joins a running cluster. `actors` None sizes the pool
    by `pool_shape` (one actor on a local Ray; a cluster's CPUs / `threads`, or GPUs /
    `gpus`); `gpus` None means one per actor when
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
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
        import ray.util  # noqa: F401 - ActorPool
    except ImportError as e:
        raise ConfigError(f"--ray needs Ray, which is not installed ({e.name or e}); "
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
    out of the terminal. A Ray this process already runs (`ray_started_early`'s) is used as
    it is and left running."""
    ray = require_ray()
    if address is not None:
        check_reachable(address)
    started = not ray.is_initialized()
    if started:
        _init(ray, address)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _init(ray: Any, address: str | None) -> None:
    """`ray.init`, keeping this process's SIGTERM handler: Ray's would exit at once, where
    the commands' handler stops as Ctrl-C does (`mltrain.commands.common.term_as_interrupt`).
    Called in the main thread: Ray's processes die with the thread that started them (Linux
    PR_SET_PDEATHSIG), and only the main thread can put the handler back."""
    local = {"num_cpus": usable_cpus(), "object_store_memory": LOCAL_OBJECT_STORE}
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, **({} if address else local))  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ConfigError(f"--ray: cannot start or join {where} ({last_line(e)}); check "
                          "`ray status` there, or run without --ray") from None  # fmt: skip
    except SystemExit as e:  # Ray's handler meanwhile: a SIGTERM stops us as Ctrl-C does
        if main and e.code == signal.SIGTERM and handler not in (None, signal.SIG_DFL):
            raise KeyboardInterrupt from None
        raise
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)


# What a command that embeds imports before its model is built: torch, timm (with torchvision)
# and the modules that build and run the model, 3-5 s of a 2-core machine's start-up.
MODEL_IMPORTS = ("torch", "timm", "mltrain.inference.embedder", "mltrain.data.pipeline",
                 "mltrain.inference.ray_embed")  # fmt: skip


class PoolWorker:
    """One actor of the embedding pool (`start_pool`). Its class lives here, free of torch,
    so its process is up at once; `warm` then imports torch and the model's modules, which
    `ray_started_early` has it do while the command is still importing and building its
    own model. `load` builds what embeds (`make`, the class `ray_embed` sends: its model,
    once), `embed` runs one block of paths on it."""

    def __init__(self) -> None:
        self.embedder: Any = None

    def warm(self) -> None:
        _import_all(MODEL_IMPORTS)

    def load(self, make: Callable[..., Any], **kwargs: Any) -> None:
        self.embedder = make(**kwargs)

    def embed(self, block: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.embedder(block)


@dataclass
class Pool:
    """Actors started for a pool of `threads` CPUs and `gpus` GPUs each."""

    actors: list[Any]
    threads: int
    gpus: float

    def take(self, n: int, threads: int, gpus: float) -> list[Any]:
        """Up to `n` of the actors where their shape is the one asked for; the rest are
        killed, and the pool is empty afterwards."""
        fits = (threads, gpus) == (self.threads, self.gpus)
        taken, rest = (self.actors[:n], self.actors[n:]) if fits else ([], self.actors)
        kill(rest)
        self.actors = []
        return taken


def start_pool(ray: Any, n: int, threads: int, gpus: float) -> list[Any]:
    """`n` new actors, each already importing torch and the model's modules (`warm`)."""
    cls = ray.remote(PoolWorker).options(num_cpus=threads, num_gpus=gpus, max_restarts=0)
    actors = [cls.remote() for _ in range(n)]
    for actor in actors:
        actor.warm.remote()
    return actors


def kill(actors: Sequence[Any]) -> None:
    if actors:
        import ray

        for actor in actors:
            ray.kill(actor)


def pool_shape(options: RayOptions, cpus: int, gpus_there: float, gpus: float,
               blocks: int | None = None) -> tuple[int, int]:  # fmt: skip
    """(actors, CPU threads per actor) for a job of `blocks` batches (None: the largest pool)
    on a Ray of `cpus` CPUs and `gpus_there` GPUs, `gpus` per actor.

    Actors: `options.actors`; else on a local Ray without `options.threads` one CPU actor (a
    second on the same machine adds a process start and a model on the same cores);
    otherwise as many as the Ray's CPUs (or GPUs) hold, at most one per
    `MIN_BATCHES_PER_ACTOR` batches (starting one costs batches' worth of time); never more
    than batches. Threads: `options.threads`; else `GPU_THREADS` decoders beside a GPU; on a
    local Ray its CPUs shared among the actors; 1 on a cluster, one single-threaded actor
    per core. A local Ray cannot grow, so a pool larger than it is refused rather than left
    waiting."""
    local = options.address is None
    shares_cpus = local and not gpus and not options.threads  # the actors split its CPUs
    threads = options.threads or (GPU_THREADS if gpus else 1)
    fits = int(gpus_there // gpus) if gpus else cpus // threads
    actors = options.actors or (1 if shares_cpus else max(1, fits))
    if local and actors > fits:
        need = f"{gpus:g} GPU" if gpus else f"{threads} CPU"
        raise ConfigError(
            f"a pool of {counted(actors, 'Ray actor')} x {need} does not fit this machine's "
            f"Ray ({cpus} CPUs, {gpus_there:g} GPUs); give fewer with --ray-actors or "
            "--ray-threads (--ray-gpus 0 embeds on CPU), or join a cluster with --ray ADDRESS"
        )
    if blocks is not None:  # no actor without a batch of its own
        per_actor = 1 if options.actors else MIN_BATCHES_PER_ACTOR
        actors = min(actors, max(1, math.ceil(blocks / per_actor)))
    if shares_cpus:
        threads = max(1, cpus // actors)
    return actors, threads


def ray_resources(ray: Any) -> tuple[int, float]:
    """(CPUs, GPUs) of the Ray this process is connected to."""
    have = ray.cluster_resources()
    return int(have.get("CPU", 1)), float(have.get("GPU", 0))


_early: Pool | None = None  # `ray_started_early`'s actors, until a pool takes them


def early_actors(n: int, threads: int, gpus: float) -> list[Any]:
    """Up to `n` actors `ray_started_early` started with this shape (the others stop)."""
    global _early
    pool, _early = _early, None
    return pool.take(n, threads, gpus) if pool is not None else []


def _stop_early() -> None:
    """Stop the early actors no pool took."""
    global _early
    pool, _early = _early, None
    if pool is not None:
        kill(pool.actors)


@contextlib.contextmanager
def ray_started_early(options: RayOptions | None,
                      imports: Sequence[str] = MODEL_IMPORTS) -> Iterator[None]:  # fmt: skip
    """For the body: where `options` ask for a new local Ray, it starts now (6-10 s on 2
    cores, mostly spent waiting for Ray's own processes) while a second thread imports
    `imports`, which the body would otherwise import after it; `ray_runtime` in the body uses
    it, and it is shut down at the end. Once it is up, the pool's actors start too
    (`early_actors` hands them to the body's pool), importing torch while the body builds its
    model. Without `options`, for a cluster, or where Ray runs already: the body alone."""
    ray = require_ray() if options is not None and options.address is None else None
    if ray is None or ray.is_initialized():
        yield
        return
    loader = threading.Thread(target=_import_all, args=(tuple(imports),), daemon=True,
                              name="mltrain-imports")  # fmt: skip
    loader.start()
    try:
        with ray_runtime(None):
            _start_early(ray, options)
            loader.join()
            try:
                yield
            finally:
                _stop_early()
    finally:
        loader.join()


def _start_early(ray: Any, options: RayOptions) -> None:
    """The largest pool this local Ray's shape asks for, where the actors' GPUs are known
    (`--ray-gpus`, or a Ray without GPUs); a pool it cannot hold is left to the body to
    refuse."""
    global _early
    cpus, gpus_there = ray_resources(ray)
    if options.gpus is None and gpus_there:
        return  # one GPU per actor or none: the model's device decides, once it is built
    gpus = options.gpus or 0.0
    try:
        actors, threads = pool_shape(options, cpus, gpus_there, gpus)
    except ConfigError:
        return
    _early = Pool(start_pool(ray, actors, threads, gpus), threads, gpus)


def _import_all(names: Sequence[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001,S110 - the body's own import says what is wrong
            return


def last_line(e: BaseException) -> str:
    """The message of a Ray error, whose text is a remote traceback: its last line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return shortened(lines[-1] if lines else type(e).__name__, 300)
