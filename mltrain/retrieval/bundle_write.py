"""Writing bundles safely: every writer (export, add) fills a staging folder beside the
bundle, writes the manifest last with the sha256 of every file, and swaps the folder into
place under the bundle's lock (`mltrain.files.replace_dir`), so the path never stands empty
or half-written. Staging folders of killed writers are deleted by the next writer, and an
export never replaces anything but an older bundle. The format is `mltrain.retrieval.bundle`."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import timm
import torch

import mltrain
from mltrain import files
from mltrain.errors import BundleError
from mltrain.files import sha256_file, torch_save
from mltrain.retrieval.bundle import (
    COLUMNS,
    DATA_FILES,
    IMAGES_DIR,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_DEPTH,
    ONNX,
    REEXPORT,
    data_files,
    is_bundle_dir,
    recover,
)
from mltrain.retrieval.gallery import Gallery, own_names
from mltrain.retrieval.shards import SHARD_NAME, Shard
from mltrain.text import counted


def versions() -> dict[str, str]:
    return {
        "mltrain": mltrain.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }


def staged(out_dir: Path, tag: str) -> contextlib.AbstractContextManager[Path]:
    """`files.staging` for a bundle: a previous bundle that a killed swap set aside is put
    back first, so it is not deleted as a stale folder."""
    return files.staging(out_dir, tag, recover=recover)


def clean_stale(out_dir: Path) -> None:
    """What killed writers left beside `out_dir`, cleared under its lock: a previous bundle
    that a killed swap set aside is put back, then every `.NAME.adding-*`, `.partial-*` and
    `.old-*` folder is deleted. Writers (export, add) call this first, whether or not they
    go on to write: an `add` with nothing new still clears a killed add's copy of the old
    bundle. Nothing happens where the folder's parent is missing or read-only (the writer's
    own checks say so, naming what to do)."""
    if not out_dir.parent.is_dir() or not os.access(out_dir.parent, os.W_OK):
        return
    with files.lock(out_dir):
        recover(out_dir)
        files.clean_stale(out_dir)


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Put the finished `tmp` folder at `out_dir`, replacing an older bundle there.

    `out_dir` is at every moment the old complete bundle or the new complete one (see
    `mltrain.files.replace_dir`; where the swap takes two renames, `load_bundle` puts the
    old bundle back after a kill between them). Callers hold `files.lock(out_dir)` (and
    `staged` removes `tmp` when this raises).
    """
    _check_replaceable(out_dir)  # again: the folder may have changed while we wrote
    files.replace_dir(tmp, out_dir)


def write_metadata(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r["path"], int(r["label"]), r["class"], r["split"]])


def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with open(path, "wb") as f:
        torch_save(state, f, path)  # a full disk: an OSError naming the file


def check_export_target(out_dir: Path) -> None:
    """A bundle is only exported to a new folder or over an older bundle (never over other
    files, nor over images enrolled since); callers check this before long work."""
    _check_replaceable(out_dir)
    foreign = _foreign_files(out_dir) if out_dir.is_dir() else []
    if foreign:
        raise BundleError(
            f"{out_dir} holds files that are no part of a bundle ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); exporting over it would delete them: "
            "move them out, or choose another folder"
        )
    added = _added_rows(out_dir) if out_dir.is_dir() else 0
    if added:
        raise BundleError(
            f"{out_dir} holds {counted(added, 'image')} enrolled with "
            "`mltrain add` since its export; "
            "exporting over it would drop them: choose another folder, or remove the bundle "
            "first to start over"
        )


def _foreign_files(bundle_dir: Path) -> list[str]:
    """Names in a bundle folder that no export or `add` writes (a user's notes, say)."""
    own = {MANIFEST, *DATA_FILES, ONNX, IMAGES_DIR, *own_names()}
    return sorted(p.name for p in bundle_dir.iterdir()
                  if p.name not in own and not SHARD_NAME.fullmatch(p.name))  # fmt: skip


def _check_replaceable(out_dir: Path) -> None:
    if (out_dir.exists() or out_dir.is_symlink()) and not (
        out_dir.is_dir() and is_bundle_dir(out_dir)
    ):
        raise BundleError(
            f"{out_dir} exists and is not a search bundle; choose another folder or remove it"
        )


def replaced_index(out_dir: Path) -> dict[str, Any] | None:
    """The manifest's index record of the bundle at `out_dir` that a swap is about to replace
    (None where there is none, or it cannot be read): read before the folder goes."""
    if not out_dir.is_dir():
        return None
    try:
        manifest = files.read_json(out_dir / MANIFEST, BundleError, MAX_MANIFEST_BYTES,
                                   MAX_MANIFEST_DEPTH, REEXPORT)  # fmt: skip
    except (OSError, BundleError):
        return None
    index = manifest.get("index") if isinstance(manifest, dict) else None
    return index if isinstance(index, dict) else None


def _added_rows(bundle_dir: Path) -> int:
    """Rows `mltrain add` put into an existing bundle (0 when its manifest cannot be read:
    nothing to protect that we can see)."""
    try:
        manifest = files.read_json(bundle_dir / MANIFEST, BundleError, MAX_MANIFEST_BYTES,
                                   MAX_MANIFEST_DEPTH, REEXPORT)  # fmt: skip
        return sum(int(a.get("count", 0)) for a in manifest.get("added", []))
    except (OSError, ValueError, TypeError, AttributeError, OverflowError, BundleError):
        return 0


def shard_entries(folder: Path, shards: Sequence[Shard]) -> list[dict[str, Any]]:
    """The manifest's record of written shards: name, rows and sha256 of each."""
    return [{"name": s.name, "rows": s.rows, "sha256": sha256_file(folder / s.name)}
            for s in shards]  # fmt: skip


def finish_manifest(
    folder: Path, manifest: dict[str, Any], kind: str, args: dict, pca: int | None,
    gallery: Gallery,
) -> None:
    """The manifest's index record (the gallery's own description) and the sha256 of every
    file, written last into the bundle folder `folder`."""
    manifest["index"] = {
        "kind": kind,
        "args": dict(args or {}),
        "pca_dim": pca,
        **gallery.describe(folder),
    }
    names = data_files(manifest)
    if (folder / ONNX).is_file():
        names = (*names, ONNX)
    manifest["files"] = {name: sha256_file(folder / name) for name in names}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
