"""Ctrl-C and SIGTERM during a run: during setup they stop at once; during training the first
one finishes the current optimizer step and saves its position, a second stops at once."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def setup_handlers() -> Iterator[None]:
    """SIGTERM interrupts as Ctrl-C does while the run is set up; the caller's handlers of
    both come back afterwards, however the run ends."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # during setup: stop at once
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set `stop`: training ends after the current optimizer step and saves
    its position. A second signal interrupts at once; an unfinished checkpoint write is then
    dropped and the previous file stays. DataLoader workers forked from this process inherit
    the handler and ignore it."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            return
        if stop.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
        stop.set()
        with contextlib.suppress(OSError):  # not print(): it may re-enter an interrupted write
            os.write(2, b"\nstopping after this step to save a checkpoint (again: stop now)\n")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def exit_interrupted(run_dir: Path) -> NoReturn:
    """After an interrupt that could not wait for a checkpoint: where to continue from, then
    exit 130 as an interrupted program does."""
    if (run_dir / "checkpoints" / "last.pt").is_file():
        print(
            f"interrupted; {run_dir}/checkpoints/last.pt holds the last saved position; "
            f"continue with --resume {run_dir}",
            file=sys.stderr,
        )
    else:
        print("interrupted before the first checkpoint; nothing to resume", file=sys.stderr)
    raise SystemExit(130) from None
