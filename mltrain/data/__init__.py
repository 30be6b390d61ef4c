"""Data: readers (folders, CSVs, archives), splits, decoding, transforms, datasets, samplers.

The samplers load on first use: pytorch-metric-learning's brings scikit-learn, scipy and pandas
(about a second), which export, search and serve never need.
"""

from typing import Any

from mltrain.data.dataset import ImageDataset, default_num_workers, make_loader
from mltrain.data.folder import IMAGE_EXTENSIONS
from mltrain.data.images import check_images, load_image
from mltrain.data.labelled import ImageFolder, Reader
from mltrain.data.readers import READERS, open_reader, read_images, resolve_root
from mltrain.data.splits import (
    SPLIT_KINDS,
    Split,
    find_duplicates,
    load_split,
    make_split,
    save_split,
)
from mltrain.data.transforms import DEFAULT_AUGMENT, eval_transform, train_transform

__all__ = [
    "DEFAULT_AUGMENT",
    "IMAGE_EXTENSIONS",
    "READERS",
    "SAMPLERS",
    "SPLIT_KINDS",
    "ImageDataset",
    "ImageFolder",
    "Reader",
    "Split",
    "build_sampler",
    "check_images",
    "default_num_workers",
    "eval_transform",
    "find_duplicates",
    "load_image",
    "load_split",
    "make_loader",
    "make_split",
    "open_reader",
    "read_images",
    "resolve_root",
    "save_split",
    "train_transform",
]


def __getattr__(name: str) -> Any:
    if name in ("SAMPLERS", "build_sampler"):
        from mltrain.data import samplers

        return getattr(samplers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
