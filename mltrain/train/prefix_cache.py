"""On-disk cache of frozen-prefix features, shared by runs that would compute the same ones.

Runs with the same backbone weights, frozen stages, preprocessing, augmentation seed and
image list get identical prefix outputs: the shipped configs share the held-out images'
entry, and those with the same augmentation (all but the Siamese one) their training views.
Files hold tensors only and load with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mltrain.files import atomic_save
from mltrain.text import counted


def cache_dir() -> Path:
    return Path(os.environ.get("MLTRAIN_CACHE", Path.home() / ".cache" / "mltrain")) / "prefix"


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def weights_identity(pretrained: Any) -> str:
    """Names the starting weights; a file is identified by its path, size and mtime."""
    if isinstance(pretrained, str) and Path(pretrained).is_file():
        st = Path(pretrained).stat()
        return f"{Path(pretrained).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return str(pretrained)


def cached(parts: dict[str, Any], compute: Callable[[], tuple[torch.Tensor, ...]]):
    """`compute()` once per distinct `parts`; later calls load the stored tensors."""
    path = cache_dir() / f"{cache_key(parts)}.pt"
    if path.is_file():
        try:
            return tuple(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            path.unlink(missing_ok=True)
    result = compute()
    try:
        atomic_save(list(result), path)
    except OSError:
        return result  # a read-only cache only costs time
    size_note(path.parent)
    return result


NOTE_BYTES = 5 * 2**30  # past this, a new entry says how large the cache has grown
_NOTED: set[Path] = set()


def size_note(folder: Path) -> None:
    """Entries are never evicted (any later run may want them), so the cache grows with each
    new backbone, image size, view count or data set: say so once it is large."""
    sizes = [f.stat().st_size for f in folder.glob("*.pt")]
    if sum(sizes) > NOTE_BYTES and folder not in _NOTED:
        _NOTED.add(folder)  # once a process: a run writes two or three entries
        held = f"{sum(sizes) / 2**30:.1f} GiB in {counted(len(sizes), 'file')}"
        print(f"note: the prefix cache {folder} holds {held}; delete it to free the space "
              "(runs recompute what they need), or set MLTRAIN_CACHE to put it elsewhere",
              file=sys.stderr)  # fmt: skip
