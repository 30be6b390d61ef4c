"""One entry point for every kind of data root: `open_reader(root)` picks the reader, and
`read_images` returns its labelled images.

A reader (the `Reader` interface in `mltrain.data.labelled`) is one module plus one entry in
`READERS`; its module is imported only when the reader is considered. A data root names its
reader with a prefix (`csv:labels.txt`, for a labels file not named .csv), else the first
reader, by name, whose `claims` accepts the path. The readers today: a folder of class
sub-folders, a `path,label` CSV, an archive of a folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mltrain.data.labelled import ImageFolder, Reader, ReadOptions
from mltrain.errors import DataError
from mltrain.registry import Registry

READERS = Registry("data reader")  # kind -> the reader class, its module imported on demand


@READERS.register("archive")
def _archive() -> type[Reader]:
    from mltrain.data.archive import ArchiveReader

    return ArchiveReader


@READERS.register("csv")
def _labels_csv() -> type[Reader]:
    from mltrain.data.labels_csv import LabelsCsvReader

    return LabelsCsvReader


@READERS.register("folder")
def _folder() -> type[Reader]:
    from mltrain.data.folder import FolderReader

    return FolderReader


def _prefixed(root: str | os.PathLike) -> tuple[str | None, Path]:
    """(reader kind, path) of a data root: `kind:path` names a reader, unless the whole
    text is a path that exists (a folder may have a colon in its name)."""
    text = os.fspath(root)
    kind, sep, rest = text.partition(":")
    if sep and kind in READERS and not Path(text).expanduser().exists():
        return kind, Path(rest).expanduser()
    return None, Path(text).expanduser()


def open_reader(root: str | os.PathLike) -> Reader:
    """The reader of data root `root` (a path, or `kind:path`), or a DataError that says
    what a data root can be."""
    kind, path = _prefixed(root)
    if not path.exists():
        if kind in (None, "archive") and (found := _in_archive(path)):
            return READERS.get("archive")()(*found)
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise DataError(f"data root {path} does not exist{where}; fix the path with --set "
                        "data.root=PATH (also where a checkpoint's config names a folder that "
                        "has moved)")  # fmt: skip
    if kind is not None:
        return READERS.get(kind)()(path)
    kinds = [READERS.get(name)() for name in READERS.names()]
    for reader in kinds:
        if reader.claims(path):
            return reader(path)
    whats = [k.what for k in kinds]
    raise DataError(
        f"data root {path} is neither {', '.join(whats[:-1])} nor {whats[-1]}; point data.root "
        f"at one of them, or name its reader before the path (csv:labels.txt; readers: "
        f"{', '.join(READERS.names())})"
    )


def _in_archive(path: Path) -> tuple[Path, Path] | None:
    """(archive, folder inside it) where `path` names a folder inside an archive file
    (`faces_small.tar.gz/IMM`: one set of several in one archive), else None."""
    from mltrain.data.archive import ArchiveReader

    for parent in path.parents:
        if ArchiveReader.claims(parent):
            return parent, path.relative_to(parent)
        if parent.exists():  # a real folder above it: the path is simply missing
            return None
    return None


def read_images(
    root: str | os.PathLike,
    exclude: Sequence[str] | str = (),
    class_depth: int | str = "auto",
    bad_images: str = "error",
) -> ImageFolder:
    """The labelled images of data root `root`, classes and files sorted naturally (s2
    before s10); `notes` say what was skipped. `bad_images: skip` also leaves out a CSV's
    rows that name no file."""
    exclude = (exclude,) if isinstance(exclude, str) else tuple(str(e) for e in exclude)
    return open_reader(root).read(ReadOptions(exclude, class_depth, bad_images))


def resolve_root(root: str | os.PathLike) -> Path:
    """`root` ready to read locally: a folder or a labels file as is, an archive extracted."""
    return open_reader(root).prepare()


def readable_root(root: str | os.PathLike) -> Path | None:
    """The folder `root` reads images from, where that is there now and nothing needs
    extracting (None otherwise): for comparing a run's files with a folder's, cheaply."""
    try:
        return open_reader(root).base()
    except DataError:
        return None


def absolute_root(root: str) -> str:
    """An existing `root` as an absolute path (symlinks kept, a reader prefix kept), so a
    run's stored config finds its data from any working folder; anything else as given, for
    `open_reader` to judge."""
    kind, path = _prefixed(root)
    if not (path.exists() or _in_archive(path)):
        return root
    return f"{kind}:{os.path.abspath(path)}" if kind else os.path.abspath(path)
