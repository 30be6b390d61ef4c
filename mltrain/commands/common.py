"""Command-line plumbing shared by the commands: config flags, and user errors as one line.

`run_main` catches failures by kind at the command boundary: a user mistake (`MltrainError`),
a file-system failure (full disk, read-only file system, permissions: `OSError`), memory
exhaustion and Ctrl-C. Each prints one line without a traceback; Ctrl-C exits 130, everything
else 2. Text that came from files (class names, paths) is made printable first, so a bundle
cannot send escape codes to the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

from mltrain.errors import ConfigError, MltrainError
from mltrain.text import error_line

INTERRUPTED = 130  # the exit status of a program stopped by SIGINT


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.root=DIR (repeatable)",
    )


def parse_config_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that a config or an override written without its flag
    (`train.py configs/triplet.yaml`, `train.epochs=3`) is told the flag it needs, where
    argparse would only say "unrecognized arguments"."""
    args, extra = parser.parse_known_args(argv)
    for item in extra:
        if item.startswith("-"):
            continue
        if item.lower().endswith((".yaml", ".yml")):
            raise ConfigError(f"unexpected argument {item}: give a config as --config {item}")
        if "=" in item:
            raise ConfigError(f"unexpected argument {item}: give an override as --set {item}")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


INTERRUPTED_LINE = "interrupted (Ctrl-C or SIGTERM); nothing half-written was left behind"


def _interrupt_in(owner: int) -> Callable:
    """A SIGTERM handler raising KeyboardInterrupt in process `owner`; a forked worker
    (DataLoader) that inherited it dies as SIGTERM says instead."""

    def handler(signum, frame) -> None:
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt

    return handler


@contextlib.contextmanager
def term_as_interrupt():
    """SIGTERM (`kill`, `timeout`, job schedulers) stops a command as Ctrl-C does, so the same
    clean-up runs: without this it would die at once and leave staging folders behind.
    Training installs its own handlers (see `mltrain.train.signals`) and restores this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt_in(os.getpid()))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_main(main: Callable[[], int | None]) -> int:
    """Run `main` and return its own exit status (None counts as 0: a command that returns
    nothing succeeded; search returns 1 when some query failed). Every failure is one line
    on stderr without a traceback: exit 2, or 130 for Ctrl-C or SIGTERM (commands remove
    their half-written output before it arrives)."""
    try:
        with term_as_interrupt():
            return main() or 0
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except (MltrainError, OSError, MemoryError) as e:
        print(error_line(e), file=sys.stderr)
        raise SystemExit(2) from None


def exit_status(main: Callable[[], int | None]) -> int:
    """`run_main`, with the exit status returned instead of raised: what a console script
    hands to `sys.exit`, and what a program running a command in-process can check."""
    try:
        return run_main(main)
    except SystemExit as e:  # a failure, or argparse's own exit (-h, a bad flag)
        return 0 if e.code is None else int(e.code)
