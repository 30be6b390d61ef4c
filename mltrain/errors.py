"""User-facing errors.

Anything raised as an `MltrainError` is a user mistake or bad input: entry points print its
message (which names the file, key or value and says what to do) without a traceback.
"""

from __future__ import annotations

import math


class MltrainError(Exception):
    """Base class for errors that are reported to the user as a message."""


class ConfigError(MltrainError):
    """A config file or override is invalid. `key` names the dotted config key at fault
    where the raiser knows it, so a caller can act on that key (a checkpoint's stored value
    that only training reads is read at its default) without reading the message."""

    def __init__(self, message: str = "", key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DataError(MltrainError):
    """The data root, an image or a split is unusable."""


class CheckpointError(MltrainError):
    """A checkpoint is missing, corrupt or unsafe."""


class BundleError(MltrainError):
    """A search bundle is missing, corrupt or inconsistent."""


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
