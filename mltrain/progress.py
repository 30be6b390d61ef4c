"""Progress of long passes: a tqdm bar on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns; redirected to a file, every redraw stays in it
(one "line" of thousands of characters per pass, which `grep` and log viewers cannot use).
When stderr is not a terminal a pass writes a line every `every_s` seconds while it runs and
one when it ends, each a complete line; a pass shorter than `QUIET_S` writes nothing (a
command embedding a few images should not fill a script's stderr with "1 batch in 0.0s").
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Generic, TypeVar

from tqdm import tqdm

T = TypeVar("T")

PERIOD_S = 30.0  # seconds between the lines of a long pass written to a file
QUIET_S = 2.0  # a pass that ends sooner (and wrote no periodic line) writes no closing line


def _silenced() -> bool:
    """`TQDM_DISABLE=1` (the benchmarks set it) silences the lines too, as it does the bars."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress(Generic[T]):
    """Iterates `iterable` like tqdm (`set_postfix`, `close`) and reports as the stream allows.

    `end_line=False` leaves the final line to the caller (training prints its own epoch line)
    and keeps only the periodic ones."""

    def __init__(
        self,
        iterable: Iterable[T],
        desc: str,
        total: int | None = None,
        initial: int = 0,
        enabled: bool = True,
        end_line: bool = True,
        unit: str = "batch",
        every_s: float = PERIOD_S,
        stream: IO[str] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.done, self.initial = initial, initial
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.end_line, self.clock = every_s, end_line, clock
        self.postfix: dict[str, Any] = {}
        self.bar: tqdm | None = None
        self.lines = enabled and not _silenced() and not _is_terminal(self.stream)
        if enabled and not self.lines and not _silenced():
            self.bar = tqdm(
                iterable, desc=desc, total=total, initial=initial, leave=False,
                dynamic_ncols=True, file=self.stream,
            )  # fmt: skip
        self.start = self.last = clock()
        self.closed, self.wrote = False, False

    def __iter__(self) -> Iterator[T]:
        if self.bar is not None:
            yield from self.bar
            return
        for item in self.iterable:
            yield item
            self.done += 1
            if self.lines and self.clock() - self.last >= self.every_s:
                self.last = self.clock()
                self._write(final=False)
        self.close()

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (the bar's postfix; the lines' tail)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(values)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.end_line and (
            self.wrote or self.clock() - self.start >= QUIET_S
        ):
            self._write(final=True)

    def line(self, final: bool) -> str:
        """What a pass writes when not on a terminal: "desc: 120/400 batches (30%), 31.0s,
        loss 0.41" while it runs; "desc: 400 batches in 1m42s, ..." at the end."""
        elapsed = _duration(self.clock() - self.start)
        if final:
            head = f"{self.desc}: {self.done} {self.units(self.done)} in {elapsed}"
        elif self.total:
            share = 100 * self.done / self.total
            units = self.units(self.total)
            head = f"{self.desc}: {self.done}/{self.total} {units} ({share:.0f}%), {elapsed}"
        else:
            head = f"{self.desc}: {self.done} {self.units(self.done)}, {elapsed}"
        tail = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return f"{head}, {tail}" if tail else head

    def units(self, n: int) -> str:
        """`unit` (singular) as many as `n`: batch, batches; image, images."""
        if n == 1:
            return self.unit
        return self.unit + ("es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s")

    def _write(self, final: bool) -> None:
        try:
            print(self.line(final), file=self.stream, flush=True)
            self.wrote = True
        except (OSError, ValueError):  # a closed pipe must not stop training
            pass


def progress(
    iterable: Iterable[T],
    desc: str,
    total: int | None = None,
    initial: int = 0,
    enabled: bool = True,
    end_line: bool = True,
    unit: str = "batch",
) -> Progress[T]:
    """`Progress` over `iterable` on stderr; `enabled=False` reports nothing (other ranks)."""
    return Progress(iterable, desc, total, initial, enabled, end_line, unit)
