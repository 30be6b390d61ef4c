"""The contact sheet of a search: each answered query beside its hits as thumbnails, outlined
green where a hit's class is the one the query's folders name (`query_class`), red where it
differs, grey where they name no class of the bundle. The server's thumbnails come from here
too."""

from __future__ import annotations

import sys
from pathlib import Path

from mltrain import files
from mltrain.data.images import load_image
from mltrain.errors import ConfigError, MltrainError
from mltrain.files import check_writable
from mltrain.retrieval.bundle import Bundle, safe_image_path
from mltrain.retrieval.search import SearchRun
from mltrain.text import printable

THUMB = 128
CAPTION = 30
PAD = 6
COLOURS = {"match": (30, 160, 60), "miss": (210, 40, 40), "unknown": (150, 150, 150),
           "query": (40, 80, 200)}  # fmt: skip


def thumbnail(path: Path | None):
    """A thumbnail PIL image, or None when there is no readable file."""
    from PIL import Image, ImageOps

    if path is None:
        return None
    try:
        img = Image.fromarray(load_image(path, THUMB))
    except MltrainError:
        return None
    return ImageOps.contain(img, (THUMB, THUMB))  # small images are scaled up too


def _placeholder(text: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
    ImageDraw.Draw(img).text((8, THUMB // 2 - 6), text, fill=(90, 90, 90))
    return img


def write_sheet(run: SearchRun, bundle: Bundle, out: str | Path) -> Path:
    """A PNG grid: one row per answered query, the query then its hits, captioned."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in run.results if r.error is None]
    cols = 1 + max([0, *(len(r.hits) for r in rows)])
    cell_w, cell_h = THUMB + 2 * PAD, THUMB + 2 * PAD + CAPTION
    sheet = Image.new("RGB", (cols * cell_w, max(1, len(rows)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    classes = set(bundle.classes)

    def cell(row: int, col: int, img, outline, lines: list[str]) -> None:
        x, y = col * cell_w, row * cell_h
        draw.rectangle([x + 2, y + 2, x + cell_w - 3, y + THUMB + 2 * PAD - 3], outline=outline,
                       width=3)  # fmt: skip
        sheet.paste(img, (x + PAD + (THUMB - img.width) // 2, y + PAD + (THUMB - img.height) // 2))
        for n, line in enumerate(lines):
            draw.text((x + PAD, y + THUMB + 2 * PAD + 1 + 13 * n), line[:22], fill="black",
                      font=font)  # fmt: skip

    missing = 0
    for r_i, r in enumerate(rows):
        qpath = Path(r.query)
        qclass = query_class(qpath.absolute(), classes)  # q.png: the current folder's
        img = thumbnail(qpath) or _placeholder("unreadable")
        cell(r_i, 0, img, COLOURS["query"], ["query", printable(qpath.name)])
        for h in r.hits:
            # A path that escapes its root is a tampered bundle: a BundleError, no sheet.
            img = thumbnail(safe_image_path(bundle, h.path))
            missing += img is None
            img = img or _placeholder("missing")
            if qclass is None:
                outline = COLOURS["unknown"]
            else:
                outline = COLOURS["match"] if h.cls == qclass else COLOURS["miss"]
            cell(r_i, h.rank, img, outline, [printable(h.cls), f"{h.score:.3f}"])
    shown = sum(len(r.hits) for r in rows)
    if missing and missing == shown:  # a wrong --image-root, or a bundle moved without images
        print(f"note: none of the {shown} hit images was found under {printable(bundle.root)}; "
              "pass the folder that holds them with --image-root", file=sys.stderr)  # fmt: skip
    out = Path(out)
    files.atomic_write(out, lambda f: sheet.save(f, format="PNG"))  # no half-written PNG
    return out


def query_class(path: Path, classes: set[str]) -> str | None:
    """The bundle class the query's folders name, the longest that matches:
    `.../Latin/character07/q.png` is `Latin/character07` in a nested bundle and `character07`
    in a flat one. None when no trailing run of its folders is a class."""
    parts = path.parent.parts
    for n in range(len(parts), 0, -1):
        name = "/".join(parts[-n:])
        if name in classes:
            return name
    return None


def check_sheet_target(out: str | Path) -> None:
    """Before any search: `--sheet` must name a file in a folder we can write (the first
    existing one on its path, when the rest is still to be made)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--sheet {out} is a folder; give a file path such as "
                          f"{out / 'sheet.png'}")  # fmt: skip
    if out.suffix.lower() != ".png":  # the sheet is written as PNG: no mislabelled file
        raise ConfigError(f"--sheet {out}: the contact sheet is a PNG; name it "
                          f"{out.with_suffix('.png').name}")  # fmt: skip
    folder = out.parent.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"--sheet {out}: {folder} is not a folder; fix the path")
    check_writable(folder, "--sheet: choose a file in a writable folder")
