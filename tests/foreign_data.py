"""Generated data sets that look nothing like Caltech101, for the any-folder tests.

- `write_drawings`: nested two-level folders of greyscale PGM line drawings, the layout of
  handwritten-character sets (`alphabet_k/char_j/NN.pgm`); each class is a fixed set of strokes,
  each image redraws them with jitter.
- `write_csv_folder`: images in one flat folder with a `labels.csv` of `path,label` rows.
- `write_photos`: a flat class-per-folder tree of JPEGs (few classes, few images).

Also runnable: `python tests/foreign_data.py OUT` writes all three under OUT.
"""

from __future__ import annotations

import colorsys
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _strokes(rng: np.random.Generator, n: int = 4) -> np.ndarray:
    return rng.uniform(0.15, 0.85, size=(n, 2, 2))  # n strokes, 2 ends, (x, y) in [0, 1]


def _drawing(strokes: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    jitter = rng.normal(0, 0.03, size=strokes.shape)
    for (x0, y0), (x1, y1) in (strokes + jitter) * size:
        draw.line([(x0, y0), (x1, y1)], fill=0, width=max(2, size // 20))
    return img


def write_drawings(
    root: Path, alphabets: int = 4, chars: int = 5, per_class: int = 10, size: int = 64
) -> Path:
    """`root/alphabet_<a>/char_<c>/<i>.pgm`: alphabets x chars classes of greyscale drawings."""
    rng = np.random.default_rng(0)
    for a in range(alphabets):
        for c in range(chars):
            folder = Path(root) / f"alphabet_{a}" / f"char_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            strokes = _strokes(rng)
            for i in range(per_class):
                _drawing(strokes, rng, size).save(folder / f"{i}.pgm")
    return Path(root)


def _photo(colour: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    noise = rng.integers(-25, 26, size=(h, w, 3))
    return Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8))


def write_photos(root: Path, classes: int = 3, per_class: int = 10, size=(48, 40)) -> Path:
    """`root/<class>/<i>.jpg`: one noisy colour per class; names sort naturally (c2 < c10)."""
    rng = np.random.default_rng(1)
    for c in range(classes):
        folder = Path(root) / f"c{c + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(colorsys.hsv_to_rgb(c / classes, 0.8, 0.9)) * 255
        for i in range(per_class):
            _photo(colour, rng, size).save(folder / f"{i}.jpg")
    return Path(root)


def write_csv_folder(root: Path, classes: int = 4, per_class: int = 8, size=(40, 40)) -> Path:
    """`root/images/<n>.png` plus `root/labels.csv` (header `path,label`); returns the CSV."""
    rng = np.random.default_rng(2)
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(classes):
        colour = np.array(colorsys.hsv_to_rgb(c / classes, 0.7, 0.8)) * 255
        for i in range(per_class):
            name = f"{c * per_class + i:04d}.png"
            _photo(colour, rng, size).save(images / name)
            rows.append((f"images/{name}", f"product {c}"))
    with open(Path(root) / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return Path(root) / "labels.csv"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "foreign-data")
    print(write_drawings(out / "drawings"))
    print(write_photos(out / "photos"))
    print(write_photos(out / "photos60", classes=6, per_class=10))
    print(write_csv_folder(out / "catalogue"))
