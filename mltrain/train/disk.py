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

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

LOGS_ALLOWANCE = 16 * 2**20  # events, split.json, metrics.json, bad_images.txt
CHECKPOINT_COPIES = 3  # last.pt, best.pt and a temporary file while one is replaced


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
