"""Enroll images into a search bundle:

  python -m mltrain add BUNDLE FOLDER_OR_IMAGE... [--class NAME]

The new images are embedded with the bundle's own model and appended to its embeddings,
metadata and index (approximate indexes are added to, not retrained); one image per class is
enough. A folder with class sub-folders adds each sub-folder as a class; otherwise an image's
class is its parent folder's name, or NAME from --class. Images outside the bundle's image
root are copied into BUNDLE/images/. The updated bundle replaces the old one in a single
step, so an interrupted add leaves the old one. With --ray [ADDRESS] (put a bare --ray
last) the images are embedded on a pool of Ray actors (docs/scale.md). The library call is
`mltrain.retrieval.add.add_images`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mltrain.commands.ray_args import add_ray_args, ray_options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mltrain add", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("bundle", help="search bundle folder (from export or evaluate.py --export)")
    p.add_argument("images", nargs="+", help="images, or folders of class sub-folders")
    p.add_argument("--class", dest="class_name", help="class of every new image (default: "
                   "each image's folder name)")  # fmt: skip
    add_ray_args(p)
    return p


def enroll(bundle: str, images: Sequence[str], class_name: str | None, ray=None) -> int:
    """Add `images` (files, or folders of class folders) to `bundle` and say how many went
    in; returns that count. `ray`: `RayOptions` to embed on Ray actors. `mltrain-search
    --add` enrolls through this too."""
    from mltrain.retrieval.add import add_images
    from mltrain.retrieval.bundle import read_manifest
    from mltrain.text import counted, printable

    target = images[0] if len(images) == 1 else list(images)
    added = add_images(bundle, target, class_name, ray)
    total = read_manifest(Path(bundle))["count"]  # the hashes were checked as it was written
    why = "" if added else ": every one was already in it"
    print(f"added {counted(added, 'image')} to {printable(bundle)} (now {total}){why}")
    return added


def main(argv: Sequence[str] | None = None) -> int:
    from mltrain.inference.ray_start import MODEL_IMPORTS, ray_started_early

    args = parser().parse_args(argv)
    ray = ray_options(args)
    # --ray: a local Ray and its actors start while torch and the bundle's code are imported
    with ray_started_early(ray, (*MODEL_IMPORTS, "mltrain.retrieval.add")):
        enroll(args.bundle, args.images, args.class_name, ray)
    return 0
