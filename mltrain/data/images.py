"""Decoding any image file on disk into an RGB uint8 array, or a `DataError` that names it.

Real folders hold greyscale, CMYK, 16-bit, palette and transparent images and the odd broken
file; one unreadable image must fail with its path (or be listed by `check_images` up front),
not with a decoder traceback hours into training.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mltrain.errors import DataError
from mltrain.progress import progress

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA = {"RGBA", "LA", "La", "RGBa", "PA"}


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.array(img)
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        # PIL's own convert clips these at 255; scale the real range down instead.
        arr = np.asarray(img).astype(np.float64)
        if mode in _SIXTEEN_BIT or (mode == "I" and arr.max() > 255):
            arr = arr / 257.0
        elif mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)  # transparent pixels become white, not black
        return np.array(white.convert("RGB"))
    return np.array(img.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV


class NotRegularFile(Exception):
    """A FIFO, socket, device or folder where an image file was expected."""


def _open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for reading only if it is a regular file. O_NONBLOCK makes opening a FIFO
    return at once (a blocking open waits for a writer forever); fstat on the open file
    then decides, so no swap between a check and the open can slip a FIFO in."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile("not a regular file (a FIFO, socket, device or folder)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _convert(img: Image.Image, size_hint: int | None) -> np.ndarray:
    """The opened `img` decoded to RGB uint8: files and uploads share this one conversion."""
    if size_hint and img.format == "JPEG":
        # The JPEG decoder scales by 1/2, 1/4 or 1/8 for free, keeping both sides >= hint.
        img.draft("RGB", (size_hint, size_hint))
    ImageOps.exif_transpose(img, in_place=True)
    return _to_rgb(img)


def _decode(path: str | os.PathLike, size_hint: int | None) -> np.ndarray:
    with _open_regular(path) as f, Image.open(f) as img:
        return _convert(img, size_hint)


def _reason(e: Exception) -> str:
    if isinstance(e, NotRegularFile):
        return str(e)
    if isinstance(e, UnidentifiedImageError):  # its text names a file object, not the file
        return "not an image Pillow can identify"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def load_image(path: str | os.PathLike, size_hint: int | None = None,
               what_to_do: str = "replace or delete the file") -> np.ndarray:  # fmt: skip
    """Read `path` as an H x W x 3 uint8 RGB array, EXIF orientation applied.

    With `size_hint`, JPEGs are decoded at a reduced scale whose sides are still >= the hint
    (pass the size the transform resizes the shorter side to); other formats ignore it.
    `what_to_do` ends the error: a data set's file is replaced, a query is another file.
    """
    try:
        return _decode(path, size_hint)
    except Exception as e:  # any decoder failure means this file is unusable
        raise DataError(f"cannot read image {path} ({_reason(e)}); {what_to_do}") from e


DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: any camera photo; a 1 KB PNG "bomb" claims far more


class ImageTooLarge(DataError):
    """An image (an upload) whose pixel count is over the limit: refused before decoding."""


def decode_image_bytes(
    data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, size_hint: int | None = None
) -> np.ndarray:
    """An in-memory image (an upload called `name`) as `load_image` would decode the file.

    The header's size is checked against `max_pixels` before any pixel is decoded: a few KB
    of PNG can claim gigapixels, and decoding them would take the whole server's memory.
    """
    if not data:
        raise DataError(f"{name} is empty; send an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageTooLarge(_too_many(name, w, h, max_pixels))
                scale = (size_hint or 0) / max(min(w, h), 1)
                if scale > 1 and w * h * scale * scale > max_pixels:  # a 100000x1 strip
                    sw, sh = round(w * scale), round(h * scale)
                    raise ImageTooLarge(f"{name} is {w}x{h}; with its shorter side scaled to "
                                        f"{size_hint} px it would be {sw}x{sh}, over the "
                                        f"{max_pixels / 1e6:g} MP limit; send a photo-shaped "
                                        "image")  # fmt: skip
                return _convert(img, size_hint)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"{name} is refused as a decompression bomb ({e}); the limit is "
                            f"{max_pixels / 1e6:g} MP") from None  # fmt: skip
    except Image.UnidentifiedImageError:  # its reason names a BytesIO object: say it plainly
        raise DataError(f"{name} is not a readable image (no image format Pillow knows); send "
                        "a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None  # fmt: skip
    except Exception as e:  # any decoder failure: not an image we can read
        raise DataError(f"{name} is not a readable image ({_reason(e)}); send a JPEG, PNG, "
                        "WebP, BMP, GIF or TIFF file") from None  # fmt: skip


def _too_many(name: str, w: int, h: int, max_pixels: int) -> str:
    mp = w * h / 1e6
    shown = f"{mp:.1f}" if mp >= 0.1 else f"{mp:.2g}"  # not "0.0 MP" for a small limit
    return (f"{name} is {w}x{h} = {shown} MP, over the {max_pixels / 1e6:g} MP "
            "limit; send a smaller image")  # fmt: skip


def _problem(path: str | os.PathLike, size_hint: int) -> str | None:
    try:
        _decode(path, size_hint)
    except Exception as e:
        return _reason(e)
    return None


def check_images(
    paths: list[Path] | list[str], size_hint: int = 64, num_workers: int = 2
) -> list[tuple[str, str]]:
    """(path, reason) for every image that does not decode, in input order.

    Decoding fully at a small JPEG draft scale is several times faster than a normal decode;
    threads suffice because Pillow releases the GIL while decoding.
    """
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = pool.map(lambda p: _problem(p, size_hint), paths)
        reasons = list(progress(results, "checking images", len(paths), unit="image"))
    return [(str(p), r) for p, r in zip(paths, reasons, strict=True) if r is not None]
