"""Adding images to an existing bundle without rebuilding it: embed the new images, add them
to the index, copy those outside the image root into the bundle's `images/`, and swap the
grown bundle into place under its lock."""

from __future__ import annotations

import copy
import filecmp
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from mltrain import files
from mltrain.data.folder import IMAGE_EXTENSIONS, images_by_class, is_image, natural_key
from mltrain.data.images import load_image
from mltrain.errors import BundleError, ConfigError, DataError
from mltrain.files import check_free_space, check_writable
from mltrain.inference.ray_embed import RayOptions, on_ray
from mltrain.retrieval.bundle import (
    BUNDLE_PREFIX,
    EMBEDDINGS,
    IMAGES_DIR,
    MANIFEST,
    METADATA,
    MODEL,
    ONNX,
    REEXPORT,
    SHARDED_FORMAT,
    Bundle,
    bundle_config,
    load_bundle,
)
from mltrain.retrieval.bundle_model import bundle_embedder
from mltrain.retrieval.bundle_write import (
    clean_stale,
    finish_manifest,
    move_into_place,
    shard_entries,
    staged,
    write_metadata,
)
from mltrain.retrieval.index import prepare
from mltrain.retrieval.shards import (
    CHUNK_ROWS,
    ShardWriter,
    shard_number,
)
from mltrain.text import counted


def _collect(
    paths_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
    label_names: str | Sequence[str] | None,
) -> tuple[list[Path], list[str]]:
    """Images to add and their class names.

    A folder with class sub-folders: each sub-folder is a class. A folder of images, or a
    list of files: the class is each file's parent folder name. `label_names` overrides:
    one name for all, or one per image.
    """
    items = [paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike)) else list(
        paths_or_folder
    )
    paths: list[Path] = []
    classes: list[str] = []
    for item in map(Path, items):
        if item.is_dir():
            found = _images_in(item, named=label_names is not None)
            paths += [p for p, _ in found]
            classes += [c for _, c in found]
        else:
            paths.append(item)
            classes.append(item.parent.name or "added")
    if not paths:
        raise DataError(f"no images to add in {paths_or_folder}")
    for p in paths:
        if not (p.exists() or p.is_symlink()):
            raise DataError(f"image {p} does not exist")
        if not files.is_regular(p):  # a FIFO would hang the reader
            raise DataError(f"image {p} is not a regular file (a folder, FIFO or device)")
        if not is_image(p):
            raise DataError(f"{p} is not an image file name ({', '.join(sorted(IMAGE_EXTENSIONS))}"
                            "); rename it or convert it")  # fmt: skip
    if label_names is not None:
        if isinstance(label_names, str):
            classes = [label_names] * len(paths)
        else:
            classes = list(label_names)
            if len(classes) != len(paths):
                raise ConfigError(
                    f"label_names has {len(classes)} names for {len(paths)} images; give one "
                    "name per image or a single name for all"
                )
    if any(not str(c).strip() for c in classes):
        raise ConfigError("a class name is empty; pass a name with --class NAME")
    return paths, classes


def _images_in(folder: Path, named: bool = False) -> list[tuple[Path, str]]:
    """(image, class) under `folder`, read as a data root is: the deepest folders holding
    images are classes named by their path (`alphabet_2/char_03`); loose images take the
    folder's own name. `named`: --class names them all, so nothing needs saying."""
    by_class, loose = images_by_class(folder)
    if loose and by_class and not named:  # training leaves them out: say what they became
        print(f"note: {counted(len(loose), 'loose image')} beside the class folders of {folder} "
              f"(e.g. {loose[0].name}) added as class {folder.name!r}; move them into a class "
              "folder, or add them on their own with --class NAME", file=sys.stderr)  # fmt: skip
    found = [(p, folder.name) for p in sorted(loose, key=lambda p: natural_key(p.name))]
    for name in sorted(by_class, key=natural_key):
        found += [(p, name) for p in sorted(by_class[name], key=lambda p: natural_key(p.name))]
    return found


def _suffix_notes(new: set[str], classes: list[str]) -> list[str]:
    """Notes for new class names that end an existing nested class (`char01` beside
    `Alpha/char01`): classes are named relative to the folder added, so adding
    `data/Alpha` makes `char01`, a class apart from the bundle's `Alpha/char01`."""
    notes = []
    for name in sorted(new, key=natural_key):
        nested = [c for c in classes if c.endswith("/" + name)]
        if nested:
            shown = ", ".join(repr(c) for c in nested[:3]) + (" ..." if len(nested) > 3 else "")
            notes.append(f"new class {name!r} is apart from the bundle's {shown}: classes are "
                         "named from the folder added; add its parent folder, or pass --class, "
                         "to add to one of those")  # fmt: skip
    return notes


def _unique_copy(src: Path, dest_dir: Path, taken: set[str], bundle_dir: Path) -> str:
    stem, suffix = src.stem, src.suffix
    name, n = src.name, 1
    while (dest_dir / name).exists() or _rel_to_bundle(dest_dir / name, bundle_dir) in taken:
        name, n = f"{stem}-{n}{suffix}", n + 1
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest_dir / name)
    return _rel_to_bundle(dest_dir / name, bundle_dir)


def _folder_name(class_name: str) -> str:
    safe = class_name.replace("/", "_").replace("\\", "_").replace("\x00", "_")
    return "added" if safe in ("", ".", "..") else safe


def _rel_to_bundle(p: Path, bundle_dir: Path) -> str:
    return BUNDLE_PREFIX + p.relative_to(bundle_dir).as_posix()


def _write_with_added(bundle: Bundle, emb: np.ndarray, tmp: Path, manifest: dict) -> int:
    """The bundle's embeddings followed by `emb`, written into `tmp`; returns the row count.

    A sharded bundle keeps its shards (hard links where possible: a shard is never changed
    once written) and gets new shards for `emb`, recorded in `manifest`. A single-file
    bundle gets a longer embeddings.npy, copied in chunks through memory maps.
    """
    dtype = np.dtype(manifest["dtype"])
    if manifest["format_version"] != SHARDED_FORMAT:
        old = bundle.embeddings
        out = open_memmap(tmp / EMBEDDINGS, mode="w+", dtype=dtype,
                          shape=(len(old) + len(emb), old.shape[1]))  # fmt: skip
        files.reserve(tmp / EMBEDDINGS)  # a full disk: an OSError now, not a SIGBUS later
        for start in range(0, len(old), CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, len(old))
            out[start:end] = old[start:end]
        out[len(old) :] = emb
        out.flush()
        return len(out)
    shards = manifest["shards"]
    for s in shards:
        try:
            os.link(bundle.path / s["name"], tmp / s["name"])
        except OSError:  # a file system without hard links
            shutil.copy2(bundle.path / s["name"], tmp / s["name"])
    first = 1 + max(shard_number(s["name"]) for s in shards)
    shard_rows = bundle_config(bundle).export.shard_size
    writer = ShardWriter(tmp, len(emb), shard_rows, dtype, first=first)
    writer.write(emb)
    manifest["shards"] = [*shards, *shard_entries(tmp, writer.close())]
    return sum(s["rows"] for s in manifest["shards"])


def add_images(
    bundle_path: str | os.PathLike,
    paths_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
    label_names: str | Sequence[str] | None = None,
    ray: RayOptions | None = None,
) -> int:
    """Embed new images with the bundle's own model and add them to its index and metadata;
    with `ray`, on a pool of Ray actors (`mltrain.inference.ray_embed`).

    Approximate indexes (IVF, PQ, HNSW) are added to, not retrained. Images under the image
    root are referenced in place; others are copied into the bundle's `images/<class>/`.
    Images already in the bundle (same metadata path) are skipped. Returns the number added.
    The new bundle is written beside the old one and swapped into place; the bundle's lock
    is held from loading to the swap, so concurrent adds queue instead of losing images.
    """
    bundle_path = Path(bundle_path)
    if not bundle_path.parent.is_dir():  # a mistyped path: say so rather than create folders
        raise BundleError(f"search bundle {bundle_path} is not a folder; pass the folder that "
                          f"holds {MANIFEST}")  # fmt: skip
    check_writable(bundle_path.parent, "--add writes the updated bundle beside the old one: "
                   "make the folder writable, or copy the bundle to a writable disk")  # fmt: skip
    with files.lock(bundle_path):
        clean_stale(bundle_path)  # even when there turns out to be nothing to add
        return _add_locked(bundle_path, paths_or_folder, label_names, ray)


def _add_locked(
    bundle_path: Path,
    paths_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
    label_names: str | Sequence[str] | None,
    ray: RayOptions | None = None,
) -> int:
    bundle = load_bundle(bundle_path)
    paths, names = _collect(paths_or_folder, label_names)
    bad = []
    for p in paths:
        try:
            load_image(p, 64, "leave it out, or pass another file")
        except DataError as e:
            bad.append(str(e))
    if bad:
        raise DataError(f"{len(bad)} image(s) cannot be added:\n  " + "\n  ".join(bad))

    manifest = copy.deepcopy(bundle.manifest)
    classes = list(manifest["classes"])
    root = bundle.root.resolve()
    known = {r["path"] for r in bundle.metadata}
    # Decide every new row's path before embedding: files already in the bundle are skipped.
    plan: list[tuple[Path, str, str | None]] = []  # (image, class, path under root or None)
    pending: set[Path] = set()
    copies = _copies_by_name(bundle_path)  # read once, not once per new image
    for p, name in zip(paths, names, strict=True):
        resolved = p.resolve()
        if resolved.is_relative_to(root):
            rel = resolved.relative_to(root).as_posix()
            if rel in known or resolved in pending:
                continue
        else:
            rel = None
            earlier = _copied_before(bundle_path, p, copies.get(p.name, []))
            if earlier == _folder_name(name):
                continue
            if earlier is not None:
                raise DataError(
                    f"{p} was added before into {IMAGES_DIR}/{earlier}/, another class than "
                    f"{name!r}; adding it again would give one image two classes: leave it "
                    "out, or name the class it has with --class")  # fmt: skip
        pending.add(resolved)
        plan.append((p, name, rel))
    if not plan:
        return 0
    for note in _suffix_notes({name for _, name, _ in plan} - set(classes), classes):
        print(f"note: {note}", file=sys.stderr)
    _check_add_space(bundle, [p for p, _, rel in plan if rel is None], len(plan))

    embedder = bundle_embedder(bundle, "auto", images=len(plan))  # the fastest for this many
    with on_ray(embedder, ray) as embedding:
        emb = embedding.embed([p for p, _, _ in plan], desc="adding images")
    if emb.shape[1] != bundle.manifest["embedding_dim"]:
        raise BundleError(
            f"the bundle's model gives {emb.shape[1]}-d embeddings, the bundle holds "
            f"{bundle.manifest['embedding_dim']}-d; {REEXPORT}"
        )
    vectors = prepare(emb, bundle.metric, "new embeddings")
    gallery = bundle.gallery

    with staged(bundle_path, "adding") as tmp:
        if (bundle_path / IMAGES_DIR).is_dir():  # a real folder: load_bundle refuses a link
            shutil.copytree(bundle_path / IMAGES_DIR, tmp / IMAGES_DIR, symlinks=True)
        new_rows = []
        taken: set[str] = set(known)
        for p, name, rel in plan:
            if rel is None:
                rel = _unique_copy(p, tmp / IMAGES_DIR / _folder_name(name), taken, tmp)
            if name not in classes:
                classes.append(name)
            taken.add(rel)
            new_rows.append(
                {"path": rel, "label": classes.index(name), "class": name, "split": "added"}
            )
        count = _write_with_added(bundle, emb, tmp, manifest)
        write_metadata(tmp / METADATA, [*bundle.metadata, *new_rows])
        # A database gallery takes the rows now; searches of the old bundle still see only its
        # own count of them, so an interrupted add changes nothing it answers.
        gallery.add(vectors, [r["label"] for r in new_rows], [r["path"] for r in new_rows])
        gallery.save(tmp)
        shutil.copy2(bundle_path / MODEL, tmp / MODEL)
        if bundle.has_onnx:  # checked by load_bundle; the graph does not change with the rows
            shutil.copy2(bundle_path / ONNX, tmp / ONNX)
        manifest["classes"] = classes
        manifest["count"] = count
        manifest.setdefault("added", []).append(
            {
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "count": len(new_rows),
            }
        )
        info = manifest["index"]
        finish_manifest(tmp, manifest, info["kind"], info.get("args"), info.get("pca_dim"),
                        gallery)  # fmt: skip
        bundle.embeddings = np.empty((0, 0), np.float32)  # release the memory map before rename
        gallery.close()  # and the database's files
        move_into_place(tmp, bundle_path)
    return len(new_rows)


def _copies_by_name(bundle_path: Path) -> dict[str, list[str]]:
    """File name -> the images/ folders holding a file of that name (sorted)."""
    base = bundle_path / IMAGES_DIR
    if not base.is_dir() or base.is_symlink():
        return {}
    out: dict[str, list[str]] = {}
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink()):
        for f in folder.iterdir():
            out.setdefault(f.name, []).append(folder.name)
    return out


def _copied_before(bundle_path: Path, image: Path, folders: list[str]) -> str | None:
    """The one of `folders` (images/ folders holding a file of this name) into which this very
    file (same bytes) was copied before, under whichever class, else None. A copy that
    resolves outside the bundle is never compared (never read)."""
    for folder in folders:
        rel = f"{IMAGES_DIR}/{folder}/{image.name}"
        try:
            copied = files.inside(bundle_path, rel, BundleError, f"added image {rel!r}")
        except BundleError:
            continue
        if files.is_regular(copied) and filecmp.cmp(image, copied, shallow=False):
            return folder
    return None


def _check_add_space(bundle: Bundle, copies: list[Path], new_rows: int) -> None:
    """Free space for the updated bundle beside the old one, before anything is embedded:
    a copy of every bundle file (shards are hard-linked where possible, counted anyway),
    the images copied in, and new rows of embeddings and index (float32, twice)."""
    need = sum(os.lstat(os.path.join(d, f)).st_size
               for d, _, names in os.walk(bundle.path) for f in names)  # fmt: skip
    need += sum(p.stat().st_size for p in copies) + new_rows * bundle.embeddings.shape[1] * 8
    check_free_space(
        [(bundle.path.parent, "the updated bundle", need + 2**20)],
        "free space, or copy the bundle to a larger disk and add there",
    )
