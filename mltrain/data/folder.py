"""The folder-tree reader: which files are images, and their classes.

A tree of class folders, classes at a fixed depth (`class_depth: 1` is one sub-folder per
class; deeper images belong to their ancestor at that depth) or, with `class_depth: auto`, the
deepest folders holding images, named by their relative path (`Greek/character01`).

Any format Pillow can decode counts as an image, by extension; a file whose extension names no
image format (`subject01.glasses`, `scan_0042`) counts by its content when its first bytes are
an image signature Pillow confirms (`sniff_image`). Only regular files are read (a
FIFO named `x.jpg` would hang a decoder). A symlink to a file is followed (it names one image,
labelled by the folder it sits in, as symlinked subsets of a data set are made), but a
symlinked folder never is: it could leave the root, alias a class read anyway, or loop and
relabel every image. What is skipped is kept in `ImageFolder.notes`, said once to the user and
recorded in the run folder.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from PIL import EpsImagePlugin, Image, ImageFile

from mltrain.data.labelled import (
    QUIET_EXCLUSIONS,
    ImageFolder,
    ReadOptions,
    exclusion_of,
    labelled_images,
    listing,
    natural_key,
)
from mltrain.errors import DataError

# Formats Pillow identifies but cannot decode here: a video, or PostScript without Ghostscript.
_UNDECODABLE = {"MPEG"} | (set() if EpsImagePlugin.has_ghostscript() else {"EPS"})


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions of every format this Pillow opens (PGM, TIFF, WebP, JPEG's .jfif...).

    Stub plugins (HDF5, GRIB, BUFR) only identify files, so their extensions are left out.
    """
    Image.init()
    exts = set()
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        if (factory is not None or fmt == "MPO") and not stub and fmt not in _UNDECODABLE:
            exts.add(ext.lower())
    return frozenset(exts)


IMAGE_EXTENSIONS = image_extensions()


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


# First bytes of the formats data sets ship without a telling extension (Yale faces: GIF files
# named subject01.glasses); a match is confirmed by Pillow before the file counts as an image.
_SIGNATURES = (b"GIF87a", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00",
               b"MM\x00*", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")  # fmt: skip


def sniff_image(path: Path) -> str | None:
    """The image format of a file by its content (None: not an image Pillow decodes here).
    Reads a few bytes; only a signature match is opened by Pillow, which parses the header."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    if not webp and not any(head.startswith(sig) for sig in _SIGNATURES):
        return None
    try:
        with Image.open(path) as im:
            fmt = im.format
    except Exception:  # noqa: BLE001 - whatever Pillow raises, the file is no image here
        return None
    return fmt if fmt and fmt not in _UNDECODABLE else None


@dataclass
class _Walk:
    """Images found under a root, by the folder (relative parts) that directly holds them."""

    images: dict[tuple[str, ...], list[Path]] = field(default_factory=dict)
    no_images: dict[tuple[str, ...], set[str]] = field(default_factory=dict)  # other suffixes
    skipped: list[str] = field(default_factory=list)
    empty: list[tuple[str, ...]] = field(default_factory=list)  # folders holding nothing
    hidden: list[str] = field(default_factory=list)  # dot-folders directly holding images
    sniffed: dict[str, list[Path]] = field(default_factory=dict)  # images by content, by format


def _walk(root: Path) -> _Walk:
    out = _Walk()
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, rel = stack.pop()
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:  # a bind mount or similar loop
            out.skipped.append(f"{folder} (a loop back to a folder already read)")
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            everything = sorted(it, key=lambda e: e.name)
        entries = [e for e in everything if not e.name.startswith(".")]
        hidden = ["/".join((*rel, e.name)) for e in everything
                  if e.name.startswith(".") and _holds_images(e)]  # fmt: skip
        out.hidden += hidden
        if not entries and not hidden and rel:  # nothing, or only .DS_Store and the like
            out.empty.append(rel)
        for entry in entries:
            _visit(entry, rel, stack, out)
    return out


def _holds_images(entry: os.DirEntry) -> bool:
    """A hidden folder (.git, .ipynb_checkpoints, a class renamed by mistake) worth a note:
    one holding images itself; only its own listing is read."""
    if not entry.is_dir(follow_symlinks=False):
        return False
    try:
        with os.scandir(entry.path) as it:
            return any(is_image(Path(e.name)) for e in it)
    except OSError:
        return False


def _visit(entry: os.DirEntry, rel: tuple[str, ...], stack: list, out: _Walk) -> None:
    path = Path(entry.path)
    if entry.is_symlink() and entry.is_dir():
        out.skipped.append(f"{path} (a symlinked folder, to {path.resolve()}; not followed)")
    elif entry.is_dir(follow_symlinks=False):
        stack.append((path, (*rel, entry.name)))
    elif not is_image(path):
        fmt = None
        if entry.is_file() and not path.name.startswith("."):
            fmt = sniff_image(path)  # an image under an extension that does not say so
        if fmt:
            out.images.setdefault(rel, []).append(path)
            out.sniffed.setdefault(fmt, []).append(path)
        elif entry.is_file():
            out.no_images.setdefault(rel, set()).add(path.suffix.lower() or "(none)")
    elif entry.is_file():  # follows a file symlink: it names one image, in this folder's class
        out.images.setdefault(rel, []).append(path)
    else:
        out.skipped.append(f"{path} (not a regular file)")


def _class_of(rel: tuple[str, ...], depth: int | str) -> str | None:
    if depth == "auto":
        return "/".join(rel) or None
    return "/".join(rel[:depth]) if len(rel) >= int(depth) else None


def group_by_class(walk: _Walk, class_depth: int | str) -> tuple[dict[str, list[Path]], list[Path]]:
    """Images by class name (relative folder path), and those above any class folder."""
    by_class: dict[str, list[Path]] = {}
    above: list[Path] = []
    for rel, files in walk.images.items():
        name = _class_of(rel, class_depth)
        (above if name is None else by_class.setdefault(name, [])).extend(files)
    return by_class, above


def images_by_class(root: Path, class_depth: int | str = "auto") -> tuple[dict, list[Path]]:
    """`group_by_class` of one folder read the way `scan_folder` reads a data root (nested
    classes named by their path, symlinked folders and non-regular files skipped), for
    callers that take any number of classes, such as adding images to a bundle."""
    return group_by_class(_walk(root), class_depth)


def scan_folder(
    root: str | os.PathLike,
    exclude: Sequence[str] | str = (),
    class_depth: int | str = "auto",
) -> ImageFolder:
    """Images under the folder `root` with their classes, both sorted naturally (class s2
    before s10). Notes say what was skipped; errors name what to fix. Data roots of any kind
    are read through `mltrain.data.readers.read_images`."""
    root = Path(root)
    exclude = [exclude] if isinstance(exclude, str) else [str(e) for e in exclude]
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; check data.root")
    walk = _walk(root)
    by_class, above = group_by_class(walk, class_depth)
    notes = [f"skipped {s}" for s in walk.skipped]
    for fmt, files in sorted(walk.sniffed.items()):
        notes.append(f"read {len(files)} {fmt} files as images by their content (their names do "
                     "not end in an image extension), e.g. "
                     f"{min(files, key=lambda p: natural_key(p.as_posix()))}")  # fmt: skip
    if above and not by_class and class_depth == "auto":  # one folder of subject01.glasses ...
        raise DataError(
            f"data root {root} has no class sub-folders with images, but {len(above)} images "
            f"lie in it (e.g. {above[0].name}); move each class's images into a folder of its "
            f"own ({root}/<class name>/<image>), or list them in a path,label CSV as data.root"
        )
    if above:
        where = "in the data root" if class_depth == "auto" else f"above depth {class_depth}"
        notes.append(f"ignored {len(above)} images {where} (no class folder), e.g. {above[0]}")
    return _labelled(root, by_class, exclude, notes, walk, class_depth)


def _labelled(root, by_class, exclude, notes, walk: _Walk, depth) -> ImageFolder:
    if not by_class:
        deeper = (f"; data.class_depth {depth} may be deeper than the images: try auto"
                  if depth != "auto" and walk.images else "")  # fmt: skip
        raise DataError(
            f"data root {root} has no class sub-folders with images; expected "
            f"{root}/<class name>/<image> (images: {listing(sorted(IMAGE_EXTENSIONS), 8)}, ...)"
            + deeper
        )
    classes = [c for c in sorted(by_class, key=natural_key) if not exclusion_of(c, exclude)]
    used = {exclusion_of(c, exclude) for c in by_class} - {None}
    notes += [
        f"data.exclude_classes: no class '{e}' under {root}; nothing excluded for it"
        for e in exclude
        if e not in used and e not in QUIET_EXCLUSIONS
    ]
    empty = [r for r in walk.no_images if depth == "auto" and "/".join(r) not in by_class and r]
    if empty:
        names = listing("/".join(r) for r in sorted(empty))
        kinds = listing(sorted(set().union(*(walk.no_images[r] for r in empty))))
        notes.append(f"folders with files but no images were left out: {names} (files: {kinds})")
    if walk.empty:
        names = sorted(("/".join(r) for r in walk.empty), key=natural_key)
        notes.append(f"empty folders were left out: {listing(names)}")
    if walk.hidden:
        notes.append(f"hidden folders holding images were left out: {listing(walk.hidden)} "
                     "(names starting with '.' are skipped; rename them to use them)")
    return labelled_images(root, {c: by_class[c] for c in classes}, notes)


class FolderReader:
    """A folder of class sub-folders (nested ones with `data.class_depth`)."""

    kind: ClassVar[str] = "folder"
    what: ClassVar[str] = "a folder"

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def claims(path: Path) -> bool:
        return path.is_dir()

    def prepare(self) -> Path:
        return self.path

    def base(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def read(self, options: ReadOptions) -> ImageFolder:
        return scan_folder(self.path, options.exclude, options.class_depth)
