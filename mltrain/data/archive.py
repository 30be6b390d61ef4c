"""The archive reader: a `.tar.gz` (or similar) of an image folder, extracted once.

Extraction goes to a temporary sibling that is renamed into place, so a folder that exists
is always complete and later runs (and other ranks) reuse it without re-reading the archive.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import ClassVar

from mltrain.data.folder import scan_folder
from mltrain.data.labelled import ImageFolder, ReadOptions
from mltrain.errors import DataError
from mltrain.files import inside
from mltrain.text import counted

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
_MARKER = ".mltrain-extracted"  # the size of the archive a folder came from, and its path


def _archive_stem(path: Path) -> str | None:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _writable(directory: Path) -> bool:
    """Writable for us, and not marked read-only (root ignores mode bits; we respect them)."""
    if not os.access(directory, os.W_OK):
        return False
    write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return bool(directory.stat().st_mode & write_bits)


def _size_stamp(archive: Path) -> str:
    # Size only: copying an archive with its extracted folder (new mtime) is not a change.
    return f"size={archive.stat().st_size}"


def extraction_dir(archive: Path) -> Path:
    """Where `archive` is (or will be) extracted: beside it, else in the user cache. A folder
    beside it that mltrain did not extract (no marker: perhaps the folder the archive was made
    from, perhaps changed since) is never taken for the archive's contents."""
    sibling = _sibling(archive)
    if _writable(archive.parent) and (not sibling.exists() or (sibling / _MARKER).is_file()):
        return sibling
    # Path and size, as the marker: a re-mounted or re-downloaded copy (new mtime) reuses it.
    key = f"{archive.resolve()}|{archive.stat().st_size}"
    short = hashlib.sha1(key.encode()).hexdigest()[:10]
    return _cache_base() / f"{sibling.name}-{short}"


def _cache_base() -> Path:
    return Path(os.environ.get("MLTRAIN_CACHE") or Path.home() / ".cache" / "mltrain" / "datasets")


def _stamp(folder: Path) -> list[str]:
    """The marker's lines: the archive's size stamp, then its path (older markers lack it);
    none for a marker that cannot be read (another process's, or damaged)."""
    try:
        return (folder / _MARKER).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def _older_extractions(archive: Path, dest: Path) -> None:
    """A note on earlier extractions of this archive left in the cache: of this path (it had
    another size then), or, from markers that do not record a path, of an archive of this
    name and size. They are not deleted here: a run elsewhere may still read them."""
    source, size = f"source={archive.resolve()}", _size_stamp(archive)
    stamps = {d: _stamp(d) for d in dest.parent.glob(f"{_sibling(archive).name}-*")
              if d != dest and (d / _MARKER).is_file()}  # fmt: skip
    older = [d for d, lines in stamps.items() if lines[1:] == [source] or lines == [size]]
    if older:
        mb = sum(f.stat().st_size for d in older for f in d.rglob("*") if f.is_file()) / 2**20
        print(f"note: {counted(len(older), 'older extraction')} of {archive.name} ({mb:.0f} MB) "
              f"remain: "
              f"{', '.join(map(str, older))}; delete them if no run still uses them",
              file=sys.stderr)


def _sibling(archive: Path) -> Path:
    """The folder beside `archive` that its extraction would be (its name without suffix)."""
    return archive.parent / (_archive_stem(archive) or archive.name)


def _extract(archive: Path, dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as e:
        raise DataError(
            f"cannot write to {dest.parent} to extract {archive} ({e}); "
            "set MLTRAIN_CACHE to a writable folder"
        ) from e
    print(f"extracting {archive} to {dest} (once; later runs reuse it)", file=sys.stderr)
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")  # "data" refuses absolute paths, "..", devices
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"cannot extract archive {archive} to {dest.parent} ({e}); check that the archive "
                "is complete and the disk has room"
            ) from e
        entries = [p for p in tmp.iterdir() if not p.name.startswith(".")]
        # A single top-level folder is the data root; otherwise the archive's top level is.
        top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        (top / _MARKER).write_text(f"{_size_stamp(archive)}\nsource={archive.resolve()}\n")
        try:
            top.rename(dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent extraction that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extracted(path: Path) -> Path:
    """The folder archive `path` extracts to, extracting it first when it is not there yet."""
    dest = extraction_dir(path)
    if not dest.is_dir():
        sibling = _sibling(path)
        if sibling.is_dir() and dest != sibling:
            print(f"note: {sibling} was not extracted from {path.name} by mltrain, so the "
                  f"archive is extracted to {dest} instead", file=sys.stderr)
        _extract(path, dest)
        if dest != _sibling(path):
            _older_extractions(path, dest)
    if (dest / _MARKER).is_file() and _stamp(dest)[:1] != [_size_stamp(path)]:
        raise DataError(
            f"archive {path} changed since it was extracted to {dest}; "
            f"delete {dest} so that it is extracted again"
        )
    return dest


class ArchiveReader:
    """A `.tar.gz` (or similar) of an image folder, read as that folder once extracted."""

    kind: ClassVar[str] = "archive"
    what: ClassVar[str] = f"a {'/'.join(ARCHIVE_SUFFIXES)} archive"

    def __init__(self, path: Path, inner: Path | None = None) -> None:
        self.path = path
        self.inner = inner  # a folder inside the archive (`faces_small.tar.gz/IMM`), or None

    @staticmethod
    def claims(path: Path) -> bool:
        return path.is_file() and _archive_stem(path) is not None

    def prepare(self) -> Path:
        return self._inside(extracted(self.path))

    def base(self) -> Path | None:
        if not self.path.is_file():
            return None
        dest = extraction_dir(self.path)
        return self._inside(dest) if dest.is_dir() else None

    def _inside(self, dest: Path) -> Path:
        """The extracted folder, or the folder `inner` names inside it: never outside it."""
        if self.inner is None:
            return dest
        what = f"data root {self.path / self.inner}"
        if self.inner.is_absolute() or ".." in self.inner.parts:
            raise DataError(f"{what}: name a folder inside the archive, without '..'")
        folder = inside(dest, self.inner.as_posix(), DataError, what)
        if not folder.is_dir():
            tops = sorted(p.name for p in dest.iterdir() if p.is_dir())
            raise DataError(f"{what}: the archive holds no folder {self.inner.as_posix()}; its "
                            f"folders: {', '.join(tops) or 'none'}")  # fmt: skip
        return folder

    def read(self, options: ReadOptions) -> ImageFolder:
        folder = self.prepare()
        try:
            return scan_folder(folder, options.exclude, options.class_depth)
        except DataError as e:  # name the archive the user gave, not the extraction cache
            given = self.path / self.inner if self.inner is not None else self.path
            raise DataError(str(e).replace(str(folder), str(given))) from None
