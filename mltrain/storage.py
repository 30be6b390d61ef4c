"""Disk checks before training: a full or read-only disk should fail in seconds, not after an
hour of training when the first checkpoint is written.

The space estimate is deliberately rough and errs on the large side:

- checkpoints: every checkpoint holds the weights (parameters and buffers of the model and the
  loss) plus the optimizer state, at most two moments per trainable parameter (AdamW/Adam; SGD
  keeps one). A run keeps `last.pt` and `best.pt`, and `atomic_save` writes a temporary copy
  next to the old file before renaming it, so up to three checkpoints exist at once; the
  checkpoints already in the run folder (a resumed run) are subtracted.
- prefix cache (`train.cache_frozen`): one bf16 prefix output per training image and view plus
  one per held-out image, and two int64s (label, index) each; entries already in the cache
  are counted too, as if they had to be written again.
- a fixed allowance for TensorBoard events, `split.json` and `metrics.json`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from mltrain.errors import MltrainError

LOGS_ALLOWANCE = 16 * 2**20  # events, split.json, metrics.json, bad_images.txt
CHECKPOINT_COPIES = 3  # last.pt, best.pt and a temporary file while one is replaced


def check_writable(folder: Path, what_to_do: str) -> None:
    """Write, fsync and delete a small probe file in `folder`: a read-only folder, a full disk
    or a permission problem shows up now rather than at the first checkpoint."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            Path(probe).unlink(missing_ok=True)
    except OSError as e:
        raise MltrainError(f"cannot write to {folder} ({e.strerror or e}); {what_to_do}") from None


def checkpoint_bytes(modules: Iterable[nn.Module]) -> int:
    """Upper estimate of one checkpoint: weights plus two optimizer moments per trainable
    parameter, plus 1 MiB for the config, classes and history."""
    total = 2**20
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            total += t.numel() * t.element_size()
        for p in module.parameters():
            if p.requires_grad:
                total += 2 * p.numel() * p.element_size()
    return total


def prefix_bytes_per_image(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Bytes the prefix cache stores per image: the frozen stages' output in bf16 plus an
    int64 label and index. Runs one zero image through the prefix in eval mode (no statistics
    change, no randomness used) and puts every module back in its previous mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model.prefix(torch.zeros(1, *input_size))
    finally:
        for m, training in modes.items():
            m.training = training
    return out.numel() * 2 + 16


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent (the cache folder may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def check_free_space(needs: list[tuple[Path, str, int]], what_to_do: str | None = None) -> None:
    """`needs` lists (folder, what goes there, bytes); folders on one filesystem add up.
    Raises `MltrainError` naming the folder, the bytes needed and free, and what to do
    (`what_to_do`, or for a training run where to point its outputs instead)."""
    by_device: dict[int, list[tuple[Path, str, int]]] = {}
    for folder, what, n in needs:
        by_device.setdefault(_existing(folder).stat().st_dev, []).append((folder, what, n))
    for entries in by_device.values():
        need = sum(n for _, _, n in entries)
        free = shutil.disk_usage(_existing(entries[0][0])).free
        if free < need:
            parts = ", ".join(f"{what} in {folder}: {_size(n)}" for folder, what, n in entries)
            raise MltrainError(
                f"not enough disk space: this run needs about {_size(need)} ({parts}) but "
                f"only {_size(free)} is free on the disk holding {entries[0][0]}; "
                + (what_to_do or "free some space, or set output_dir (checkpoints) or the "
                   "MLTRAIN_CACHE environment variable (prefix cache) to a folder on a larger "
                   "disk")
            )


def check_output_folders(needs: list[tuple[Path, str, int]], what_to_do: str) -> None:
    """Before long work whose results go to folders that may not exist yet: the first
    existing folder on each path is writable (probe file) and the disks have the bytes."""
    for folder, what, _ in needs:
        check_writable(_existing(folder.parent), f"{what}: {what_to_do}")
    check_free_space([(_existing(folder), what, n) for folder, what, n in needs], what_to_do)


def run_space_needs(
    run_dir: Path, checkpoint_size: int, cache: tuple[Path, int] | None
) -> list[tuple[Path, str, int]]:
    """What a run will write where: checkpoints and logs in `run_dir`, and the prefix cache
    (folder, bytes) when it is used."""
    folder = run_dir / "checkpoints"
    have = sum(p.stat().st_size for p in folder.glob("*.pt")) if folder.is_dir() else 0
    need = max(CHECKPOINT_COPIES * checkpoint_size - have, checkpoint_size) + LOGS_ALLOWANCE
    needs = [(run_dir, "checkpoints and logs", need)]
    if cache is not None:
        needs.append((cache[0], "prefix cache", cache[1]))
    return needs
