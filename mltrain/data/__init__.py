"""Data: readers (folders, CSVs, archives), splits, decoding, transforms, datasets, samplers.

The datasets, transforms and samplers load on first use: torch, albumentations and
pytorch-metric-learning's scikit-learn, scipy and pandas take seconds to import, which
`mltrain download` and the readers alone never need.
"""

import importlib
from typing import Any

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


_LAZY = {
    "ImageDataset": "dataset",
    "default_num_workers": "dataset",
    "make_loader": "dataset",
    "DEFAULT_AUGMENT": "transforms",
    "eval_transform": "transforms",
    "train_transform": "transforms",
    "SAMPLERS": "samplers",
    "build_sampler": "samplers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"mltrain.data.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
