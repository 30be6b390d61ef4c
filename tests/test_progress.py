"""Progress reporting: complete lines in a log file, a bar only on a terminal."""

from __future__ import annotations

import io

import pytest

from mltrain.progress import Progress


class Clock:
    """A clock the test moves by hand: each call returns the current time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def bars_allowed(monkeypatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def test_a_file_gets_periodic_lines_and_one_closing_line() -> None:
    out, clock = io.StringIO(), Clock()
    seen = []
    bar = Progress(range(10), "held-out embeddings", total=10, stream=out, clock=clock,
                   every_s=30.0)  # fmt: skip
    for i in bar:
        seen.append(i)
        clock.now += 10.0  # a line every third item
        bar.set_postfix(loss="0.5000")
    assert seen == list(range(10))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "held-out embeddings: 3/10 batches (30%), 30.0s, loss 0.5000"
    assert len(lines) == 4  # at 30 s, 60 s, 90 s, then the end
    assert lines[-1] == "held-out embeddings: 10 batches in 1m40s, loss 0.5000"


def test_a_short_pass_writes_nothing_a_longer_one_its_closing_line() -> None:
    out, clock = io.StringIO(), Clock()
    for _ in Progress(range(3), "bundle embeddings", total=3, stream=out, clock=clock):
        clock.now += 0.5
    assert out.getvalue() == ""  # 1.5 s: not worth a line
    for _ in Progress(range(3), "bundle embeddings", total=3, stream=out, clock=clock):
        clock.now += 1.0
    assert out.getvalue() == "bundle embeddings: 3 batches in 3.0s\n"


def test_the_caller_may_keep_the_closing_line() -> None:
    out = io.StringIO()
    clock = Clock()
    bar = Progress(range(3), "epoch 1", total=3, end_line=False, stream=out, clock=clock)
    for _ in bar:
        clock.now += 5.0
    bar.close()
    assert out.getvalue() == ""  # no periodic line (15 s), and the epoch line is the caller's


def test_a_terminal_gets_a_bar() -> None:
    term = Terminal()
    bar = Progress(range(3), "epoch 1", total=3, stream=term)
    assert list(bar) == [0, 1, 2]
    assert "\r" in term.getvalue() and "epoch 1" in term.getvalue()


def test_disabled_or_silenced_writes_nothing(monkeypatch) -> None:
    out = io.StringIO()
    assert list(Progress(range(3), "x", enabled=False, stream=out)) == [0, 1, 2]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(Progress(range(3), "x", stream=Terminal())) == [0, 1, 2]
    assert list(Progress(range(3), "x", stream=out)) == [0, 1, 2]
    assert out.getvalue() == ""
