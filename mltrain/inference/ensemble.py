"""Several trained runs embedding as one: each member's embedding L2-normalised, concatenated,
and scaled by 1/sqrt(n), so the ensemble's cosine similarity is the mean of its members'.

Runs trained differently (another backbone, loss or seed) miss different queries; averaging
their similarities is the cheapest way to combine them, with no further training. An ensemble
is evaluated (`evaluate.py --checkpoint A --checkpoint B`), not exported: a bundle holds one
model. Every member must have been trained on the same split, or one member's training images
would be another's held-out queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mltrain.config import Config
from mltrain.errors import ConfigError
from mltrain.inference.embedder import Embedder, embedder_from_checkpoint
from mltrain.inference.vectors import l2_normalize

# What decides a run's split (see `mltrain.data.splits`): members must agree on each.
SPLIT_KEYS = ("data.root", "data.exclude_classes", "data.class_depth", "data.split",
              "data.train_fraction", "seed")  # fmt: skip


def _get(cfg: Config, key: str):
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def _same(key: str, a, b) -> bool:
    if key == "data.root":  # relative roots of older runs: compare where they point
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def check_shared_split(members: Sequence[tuple[str, Config]]) -> None:
    """Raises `ConfigError` naming the first split key on which a member differs from the
    first, so no member's training images can be scored as held-out queries."""
    (first, base), *rest = members
    for source, cfg in rest:
        for key in SPLIT_KEYS:
            if not _same(key, _get(cfg, key), _get(base, key)):
                raise ConfigError(
                    f"{source}: {key} is {_get(cfg, key)!r} but {first} has "
                    f"{_get(base, key)!r}; an ensemble's runs must share one split "
                    f"({', '.join(SPLIT_KEYS)})"
                )


@dataclass
class EnsembleEmbedder:
    """Embeds like an `Embedder` for evaluation: the first member's config decides the data,
    split and evaluation settings."""

    members: list[Embedder]
    sources: list[str] = field(default_factory=list)
    global_step: int = 0  # no single training axis to log on

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ConfigError("an ensemble needs at least 2 checkpoints")

    @property
    def cfg(self) -> Config:
        return self.members[0].cfg

    @property
    def embedding_dim(self) -> int:
        return sum(m.embedding_dim for m in self.members)

    def embed(self, paths: list[Path], labels: np.ndarray | None = None,
              desc: str = "embedding") -> np.ndarray:  # fmt: skip
        parts = [
            l2_normalize(m.embed(paths, labels, desc=f"{desc} ({i + 1}/{len(self.members)})"))
            for i, m in enumerate(self.members)
        ]
        return (np.concatenate(parts, axis=1) / np.sqrt(len(parts))).astype(np.float32)


def ensemble_from_checkpoints(
    paths: Sequence[str | Path], overrides: list[str] | None = None
) -> EnsembleEmbedder:
    """Each checkpoint (or run folder: its best.pt) rebuilt from its own config, `overrides`
    applied to every one; refused unless they share a split (`check_shared_split`)."""
    members = [embedder_from_checkpoint(p, overrides) for p in paths]
    sources = [str(p) for p in paths]
    check_shared_split(list(zip(sources, [m.cfg for m in members], strict=True)))
    return EnsembleEmbedder(members, sources)
