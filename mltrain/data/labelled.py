"""What every data reader returns (`ImageFolder`), the interface a reader implements
(`Reader`), and the helpers readers share: natural order, exclusions, short listings.

Kept apart from the readers themselves so that each reader (folder tree, labels CSV,
archive) depends only on this module, and the registry in `mltrain.data.readers` can import
them on demand without any of them importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from mltrain.errors import DataError


@dataclass
class ImageFolder:
    """Labelled images: `labels[i]` indexes `classes` for `paths[i]`; paths lie under `root`."""

    root: Path
    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # what was skipped or adapted, and why

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class ReadOptions:
    """The data.* keys every reader honours (a reader ignores those its layout lacks:
    a CSV has no folder depth)."""

    exclude: tuple[str, ...] = ()
    class_depth: int | str = "auto"
    bad_images: str = "error"  # skip: a CSV's rows naming no file are left out too


class Reader(Protocol):
    """One kind of data root, bound to a path. `mltrain.data.readers` picks the reader:
    a `kind:` prefix on data.root names it, else the first whose `claims` says yes."""

    kind: ClassVar[str]  # the registry name, also the data.root prefix
    what: ClassVar[str]  # "a folder of class sub-folders": for the message naming valid roots
    path: Path

    @staticmethod
    def claims(path: Path) -> bool:
        """Whether this reader reads an existing `path` given without a prefix."""
        ...

    def prepare(self) -> Path:
        """The local file or folder read: the path itself, or an archive extracted once."""
        ...

    def base(self) -> Path | None:
        """The folder image paths are relative to, when it is there now without extracting
        anything (None otherwise): for comparing a run's files with a folder's, cheaply."""
        ...

    def read(self, options: ReadOptions) -> ImageFolder:
        """The labelled images, sorted naturally; notes say what was skipped, errors what
        to fix."""
        ...


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: s2 < s10, 2 < 10, then by the text itself."""
    parts = re.split(r"(\d+)", name)
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name)


def exclusion_of(name: str, exclude: Sequence[str]) -> str | None:
    """The exclusion that removes class `name`: itself or a folder above it."""
    for e in exclude:
        if name == e or name.startswith(e.rstrip("/") + "/"):
            return e
    return None


def listing(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# Excluded by default (Caltech101's clutter folder): absent from most folders, so its absence
# is not worth a note on every run; a name the user wrote and that matches nothing is.
QUIET_EXCLUSIONS = frozenset({"BACKGROUND_Google"})


def labelled_images(root: Path, by_class: dict[str, list[Path]], notes: list[str]) -> ImageFolder:
    """An `ImageFolder` from class -> files (classes in the order given, files sorted)."""
    if len(by_class) < 2:
        raise DataError(
            f"data root {root} has {len(by_class)} class ({', '.join(by_class)}) after "
            "data.exclude_classes; metric learning needs at least 2 classes"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, files in enumerate(by_class.values()):
        files = sorted(files, key=lambda p: natural_key(p.as_posix()))
        paths += files
        labels += [label] * len(files)
    return ImageFolder(root, paths, np.asarray(labels, dtype=np.int64), list(by_class), notes)
