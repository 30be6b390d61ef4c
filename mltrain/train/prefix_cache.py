"""On-disk cache of frozen-prefix features, shared by runs that would compute the same ones.

Runs with the same backbone weights, frozen stages, preprocessing, augmentation seed and
image list get identical prefix outputs: the shipped configs share the held-out images'
entry, and those with the same augmentation (all but the Siamese one) their training views.
Files hold tensors only and load with `weights_only=True`. The folder is capped
(`MLTRAIN_CACHE_GB`, 20 by default): past it the least recently used entries go.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mltrain.errors import ConfigError
from mltrain.files import atomic_save, size_text
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
            result = tuple(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            path.unlink(missing_ok=True)
        else:
            _touch(path)  # recently used: the last to be evicted
            return result
    result = compute()
    try:
        atomic_save(list(result), path)
    except OSError:
        return result  # a read-only cache only costs time
    evict(path.parent, keep=path)
    return result


DEFAULT_GB = 20.0


def cache_limit() -> int:
    """The bytes the cache may hold: `MLTRAIN_CACHE_GB` GiB (20 when unset). Training checks it
    before any work, so a mistyped value fails in seconds."""
    raw = os.environ.get("MLTRAIN_CACHE_GB", "").strip()
    if not raw:
        return int(DEFAULT_GB * 2**30)
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise ConfigError(f"MLTRAIN_CACHE_GB={raw!r}: give the most GiB the prefix cache may "
                          f"hold, a positive number (unset: {DEFAULT_GB:g})")  # fmt: skip
    return int(gb * 2**30)


def evict(folder: Path, keep: Path) -> None:
    """Delete the least recently used entries (a hit touches its file) until the folder fits
    `cache_limit()`, never `keep`, the entry just written, and a day-old temporary file that a
    killed write left; a note says what went. Eviction only saves space, so a file that will
    not go (gone already, another user's) is passed over rather than stopping the run."""
    entries, now = [], time.time()
    for f in [*folder.glob("*.pt"), *folder.glob(".*.pt.*.tmp")]:
        try:
            st = f.stat()
        except OSError:
            continue
        if f.suffix == ".tmp":
            if now - st.st_mtime > STALE_TMP_S:
                _remove(f)
            continue
        entries.append((st.st_mtime_ns, st.st_size, f))
    total, limit = sum(size for _, size, _ in entries), cache_limit()
    freed: list[int] = []
    for _, size, f in sorted(entries):
        if total <= limit:
            break
        if f != keep and _remove(f):
            total -= size
            freed.append(size)
    if freed:
        print(f"note: the prefix cache {folder} passed its cap of {size_text(limit)} "
              f"(MLTRAIN_CACHE_GB): removed the {counted(len(freed), 'file')} used least "
              f"recently ({size_text(sum(freed))}); set MLTRAIN_CACHE_GB to keep more",
              file=sys.stderr)  # fmt: skip


STALE_TMP_S = 24 * 3600  # a write still going on is minutes old, never a day


def _remove(path: Path) -> bool:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache is read in any order
