"""Ray for the commands that embed on it (`mltrain.inference.ray_embed`): the pool flags as
`RayOptions`, Ray's presence and a cluster's address checked, and Ray started or joined for a
body (`ray_runtime`). Nothing here imports torch, so `ray_started_early` can start a local
Ray (6-10 s on 2 cores) while a command's imports of torch and the model's modules go on
beside it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from mltrain.errors import ConfigError
from mltrain.text import shortened

RAY_EXTRA = "pip install -e '.[ray]'"
LOCAL_OBJECT_STORE = 256 * 2**20  # rows of paths and embeddings only; the minimum is 75 MiB
CONNECT_TIMEOUT_S = 5.0  # Ray Client would retry for 30 s before saying anything


def usable_cpus() -> int:
    """CPUs this process may use (`mltrain.runtime.usable_cpus`, which imports torch)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    out of the terminal. A Ray this process already runs (`ray_started_early`'s) is used as
    it is and left running."""
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


@contextlib.contextmanager
def ray_started_early(options: RayOptions | None,
                      imports: Sequence[str] = MODEL_IMPORTS) -> Iterator[None]:  # fmt: skip
    """For the body: where `options` ask for a new local Ray, it starts now (6-10 s on 2
    cores, mostly spent waiting for Ray's own processes) while a second thread imports
    `imports`, which the body would otherwise import after it; `ray_runtime` in the body uses
    it, and it is shut down at the end. Once it is up, a third thread runs Ray Data's first
    task (a dataset's block metadata: a worker importing Ray Data, about 1 s) while the body
    builds its model. Without `options`, for a cluster, or where Ray runs already: the body
    alone."""
    ray = require_ray() if options is not None and options.address is None else None
    if ray is None or ray.is_initialized():
        yield
        return
    loader = threading.Thread(target=_import_all, args=(tuple(imports),), daemon=True,
                              name="mltrain-imports")  # fmt: skip
    loader.start()
    try:
        with ray_runtime(None):
            warm = threading.Thread(target=_first_data_task, daemon=True, name="mltrain-ray-warm")
            warm.start()
            loader.join()
            try:
                yield
            finally:
                warm.join(timeout=30)  # a second or so; a task Ray never ran gives up below
    finally:
        loader.join()


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001,S110 - the body's own import says what is wrong
            return


def _first_data_task() -> None:
    try:
        import pyarrow as pa
        import ray.data

        ray.data.from_arrow(pa.table({"row": np.zeros(1, np.int64)}))
    except Exception:  # noqa: BLE001,S110 - only a warm-up: the real dataset says what fails
        pass


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


def last_line(e: BaseException) -> str:
    """The message of a Ray error, whose text is a remote traceback: its last line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return shortened(lines[-1] if lines else type(e).__name__, 300)
