"""Data: image folders and archives, splits, decoding, transforms, datasets and samplers."""

from mltrain.data.archive import resolve_root
from mltrain.data.dataset import ImageDataset, default_num_workers, make_loader
from mltrain.data.folder import IMAGE_EXTENSIONS, ImageFolder, scan_folder
from mltrain.data.images import check_images, load_image
from mltrain.data.samplers import SAMPLERS, build_sampler
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
    "SAMPLERS",
    "SPLIT_KINDS",
    "ImageDataset",
    "ImageFolder",
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
    "resolve_root",
    "save_split",
    "scan_folder",
    "train_transform",
]
