"""Shared fixtures: tiny image folders generated on the fly (no real data in fast tests)."""

from __future__ import annotations

import colorsys
import struct
import zlib
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
# The same for commands that only embed (evaluate, export, compare): they refuse train.* keys.
TINY_EMBED = [s for s in TINY_RUN if not s.startswith("train.")]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny inputs gain nothing from a second thread; on a shared machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread_private_cache(monkeypatch, tmp_path):
    """Training tests: one torch thread, and a prefix cache of the test's own (a shared one
    would let one test's cached features answer another's)."""
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHAPES = ("circle", "square", "stripes", "triangle")


def write_shapes_gallery(root: Path, per_class: int = 4, size: int = 64) -> Path:
    """`root/<shape>/img_NNN.{jpg,png}`: each class a shape in its own colour, each image
    at its own place, size and shade; distinct enough that every image's nearest neighbour
    under a random network is itself, and a contact sheet shows what the classes are."""
    from PIL import ImageDraw

    rng = np.random.default_rng(1)
    for c, shape in enumerate(SHAPES):
        folder = Path(root) / shape
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            hue = (c / len(SHAPES) + 0.04 * j) % 1.0
            colour = tuple(int(v * 255) for v in colorsys.hsv_to_rgb(hue, 0.85, 0.9))
            back = tuple(int(v) for v in rng.integers(200, 256, 3))
            img = Image.new("RGB", (size, size), back)
            draw = ImageDraw.Draw(img)
            r = int(size * rng.uniform(0.2, 0.35))
            x, y = (int(v) for v in rng.integers(r, size - r, 2))
            if shape == "circle":
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            elif shape == "square":
                draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
            elif shape == "stripes":
                for s in range(-size, size, max(4, r // 2)):
                    draw.line([s + j * 3, 0, s + size + j * 3, size], fill=colour, width=3)
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
            img.save(folder / f"img_{j:03d}.{'jpg' if j % 2 == 0 else 'png'}", quality=95)
    return Path(root)


def tiny_embedder(root: Path, backbone: str = "test_efficientnet", image_size: int = 32,
                  k: int = 5):  # fmt: skip
    """A random-weight embedder over `root` for bundle tests: no download, fp32 (CPU bf16
    autocast is ~10x slower on tiny inputs), a flat index, seeded so it is the same each call."""
    from mltrain.config import Config
    from mltrain.inference.embedder import make_embedder
    from mltrain.model.network import build_model

    cfg = Config()
    cfg.model.backbone = backbone
    cfg.model.pretrained = False
    cfg.model.image_size = image_size
    cfg.data.root = str(root)
    cfg.data.exclude_classes = []
    cfg.data.num_workers = 0
    cfg.eval.amp = "off"
    cfg.export.index = "flat"
    cfg.export.k = k
    torch.manual_seed(0)
    return make_embedder(cfg, build_model(cfg.model))


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(image root, bundle) for the serving tests: 4 shape classes x 4 images of 64 px, a
    random test_efficientnet at 32 px, a flat cosine index and calibrated thresholds.
    Built once per session; tests must not change it."""
    from mltrain.retrieval.export import export_bundle

    base = tmp_path_factory.mktemp("served")
    root = write_shapes_gallery(base / "data")
    return root, export_bundle(tiny_embedder(root, k=4), base / "b", "serve")


def gallery(root: Path) -> list[Path]:
    """The images of a generated folder, sorted (JPEG and PNG alternate)."""
    return sorted(p for p in root.rglob("img_*") if p.is_file())


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height pixels: a pixel bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
