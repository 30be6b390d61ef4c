"""A torch Dataset over image paths, and a reproducible DataLoader factory."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mltrain.data.class_augment import turn
from mltrain.data.images import load_image
from mltrain.errors import ConfigError, MltrainError
from mltrain.runtime import usable_cpus


class ImageDataset(Dataset):
    """Items are `(image tensor, label, index)`; the index lets callers map embeddings back.
    `turns`: each item's `data.class_augment` turn, applied before `transform` ("" for none)."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        labels: Sequence[int] | np.ndarray,
        transform: Callable[[np.ndarray], torch.Tensor],
        size_hint: int | None = None,
        turns: Sequence[str] | None = None,
    ) -> None:
        if len(paths) != len(labels) or (turns is not None and len(turns) != len(paths)):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels"
                             + ("" if turns is None else f" and {len(turns)} turns"))
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.size_hint = size_hint  # see load_image: cheap JPEG downscaling while decoding
        self.turns = list(turns) if turns is not None and any(turns) else None  # class_augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = load_image(self.paths[index], self.size_hint)
        if self.turns is not None:
            image = turn(image, self.turns[index])
        try:
            tensor = self.transform(image)
        except MltrainError as e:  # say which image, e.g. one too small for a fixed crop
            raise type(e)(f"image {self.paths[index]}: {e}") from e
        return tensor, int(self.labels[index]), int(index)


def default_num_workers() -> int:
    """CPUs this process may use (not the whole machine's), at most 4."""
    return min(usable_cpus(), 4)


def worth_workers(items: int, batch_size: int) -> bool:
    """Starting worker processes costs more than loading fewer than 2 batches."""
    return items >= 2 * batch_size


def _init_worker(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides what happens (e.g.
    # finish the step and save, see `mltrain.train.run.fit`), so a worker must not die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _seed_everything_in_worker(worker_id)


def _seed_everything_in_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed from the loader's
    # generator); derive numpy, random and the albumentations stream from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    _reseed_transform(info.dataset if info else None, seed)


def _reseed_transform(dataset: Any, seed: int) -> None:
    # albumentations keeps its own RNG: forked workers would otherwise share one stream
    # and apply identical augmentations.
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    num_workers: int | None = None,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader whose order and augmentations are reproducible for a given `seed`.

    `num_workers=None` picks `default_num_workers()`, or 0 when not `worth_workers`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if sampler is not None and shuffle:
        raise ConfigError("shuffle and a sampler exclude each other: the sampler sets the order")
    if num_workers is None:
        num_workers = default_num_workers() if worth_workers(len(dataset), batch_size) else 0
    if num_workers == 0:
        _reseed_transform(dataset, seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
