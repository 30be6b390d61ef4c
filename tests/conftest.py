"""Shared fixtures: tiny image folders generated on the fly (no real data in fast tests)."""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def write_image_folder(
    root: Path,
    classes: int | Sequence[str] = 3,
    per_class: int | Sequence[int] = 6,
    size: tuple[int, int] = (40, 32),
) -> Path:
    """Write `root/<class>/img_NNN.{jpg,png}`: one solid colour per class plus noise.

    `size` is (width, height) as in PIL; images alternate JPEG and PNG; `classes` is a count
    (names class_0, class_1, ...) or a list of names; `per_class` a count or one per class.
    """
    names = [f"class_{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    counts = [per_class] * len(names) if isinstance(per_class, int) else list(per_class)
    rng = np.random.default_rng(0)
    w, h = size
    for c, (name, count) in enumerate(zip(names, counts, strict=True)):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(colorsys.hsv_to_rgb(c / len(names), 0.8, 0.9)) * 255
        for j in range(count):
            noise = rng.integers(-20, 21, size=(h, w, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{j:03d}.{'jpg' if j % 2 == 0 else 'png'}")
    return Path(root)


@pytest.fixture
def make_image_folder() -> Callable[..., Path]:
    """Factory: `make_image_folder(root, classes=3, per_class=6, size=(40, 32)) -> root`."""
    return write_image_folder


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """3 classes x 6 images of 40 x 32 px under tmp_path/data."""
    return write_image_folder(tmp_path / "data")


# config overrides for tiny, fast runs on generated images
TINY_RUN = [
    "model.pretrained=false",
    "model.image_size=32",
    "data.exclude_classes=[]",
    "data.num_workers=0",
    "train.batch_size=8",
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny inputs gain nothing from a second thread; on a shared machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
