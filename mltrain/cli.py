"""Command-line plumbing shared by the entry points: user errors become one clear line.

`run_main` (and `mltrain.retrieval.search.main`) catch failures by kind at the command boundary: a
user mistake (`MltrainError`), a file-system failure (full disk, read-only file system,
permissions: `OSError`), memory exhaustion and Ctrl-C. Each prints one line without a
traceback; Ctrl-C exits 130, everything else 2. Text that came from files (class names,
paths) is made printable first, so a bundle cannot send escape codes to the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable

from mltrain.errors import ConfigError, MltrainError

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


def check_number(flag: str, value: float, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False, what: str = "") -> None:  # fmt: skip
    """A numeric command-line flag, finite and in its range, or a one-line `ConfigError`
    naming it: `float` takes `nan` and `inf`, which pass every comparison or none and fail
    later (`int(nan)`, a threshold no score reaches). `low_open`/`high_open` leave an end
    out; `what` says what the value is."""
    inside = ((value > low) if low_open else (value >= low)) and (
        (value < high) if high_open else (value <= high)
    )
    if math.isfinite(value) and inside:
        return
    ends = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ConfigError(f"{flag} {value:g} is not a finite number in {ends}"
                      f"{f' ({what})' if what else ''}; give one in that range")  # fmt: skip


def shortened(text: str, limit: int) -> str:
    """`text` cut to `limit` characters by an ellipsis in the middle, so that the end stays
    (`…/character02`, `….png`, what tells nested class names and files apart): for table
    columns and figure labels, never for what a program reads (JSON keeps names whole)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 3
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def counted(n: int, noun: str) -> str:
    """`1 image`, `2 images`: messages count in words."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def printable(text: object, keep_newlines: bool = False) -> str:
    """`text` with control and format characters (escape codes, bidi overrides, newlines)
    written as `\\x1b`-style escapes, so that names from untrusted files print as they are
    rather than steering the terminal. `keep_newlines` keeps line breaks of messages that
    list one item per line (they move the cursor, nothing more)."""
    out = []
    for ch in str(text):
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free space or choose another folder",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: fix the permissions or choose another folder",
    errno.EPERM: "not permitted: fix the permissions or choose another folder",
    errno.EISDIR: "it is a folder: give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system: shorten it",
}


def os_error_message(e: OSError) -> str:
    """One line for a file-system failure: the file, what went wrong and what to do."""
    names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e) or type(e).__name__
    advice = _ADVICE.get(e.errno, "check the path, the disk and the permissions")
    return f"{names + ': ' if names else ''}{what}; {advice}"


def error_line(e: BaseException) -> str:
    """The one line `run_main` prints for a failure caught at the command boundary."""
    if isinstance(e, MltrainError):
        text = str(e)
    elif isinstance(e, OSError):
        text = os_error_message(e)
    else:  # MemoryError
        text = ("out of memory; use a smaller batch (eval.batch_size, train.batch_size), a "
                "smaller model or a machine with more memory")  # fmt: skip
    lines = printable(text, keep_newlines=True).split("\n")
    return "error: " + "\n".join(shortened(line, MAX_LINE) for line in lines)


# Longest line of an error: a value pasted by mistake (a path of a million characters in an
# OSError, say) must not become a message of megabytes; the middle goes, the end stays.
MAX_LINE = 2000


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
    Training installs its own handlers (see `mltrain.train.run`) and restores this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt_in(os.getpid()))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_main(main: Callable[[], object]) -> None:
    """Run `main`; every failure is one line on stderr without a traceback: exit 2, or 130
    for Ctrl-C or SIGTERM (commands remove their half-written output before it arrives)."""
    try:
        with term_as_interrupt():
            main()
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except (MltrainError, OSError, MemoryError) as e:
        print(error_line(e), file=sys.stderr)
        raise SystemExit(2) from None
