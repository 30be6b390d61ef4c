"""Image transforms (albumentations on numpy RGB arrays) built from timm's data config.

The eval transform matches timm's (resize by 1/crop_pct, center crop) so that embeddings match
what the backbone was trained on; training augmentations are named in the config.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import CropSizeError
from albumentations.pytorch import ToTensorV2

from mltrain.errors import ConfigError, DataError

DEFAULT_AUGMENT: tuple[dict[str, Any], ...] = (
    {"name": "RandomResizedCrop", "args": {"scale": [0.6, 1.0]}},
    {"name": "HorizontalFlip", "args": {"p": 0.5}},
)
# timm's interpolation names -> OpenCV flags ("random" has no cv2 twin: bilinear).
_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4, "box": cv2.INTER_AREA, "hamming": cv2.INTER_LINEAR,
    "random": cv2.INTER_LINEAR,
}  # fmt: skip
_ADDED_BY_US = {"Normalize", "ToTensorV2"}
# Transforms after which the output size is no longer the one a crop or resize fixed.
_CHANGE_SIZE = {
    "SmallestMaxSize",
    "LongestMaxSize",
    "PadIfNeeded",
    "RandomScale",
    "Crop",
    "CropAndPad",
    "RandomCropFromBorders",
    "BBoxSafeRandomCrop",
    "RandomCropNearBBox",
}


class CenterCrop(A.ImageOnlyTransform):
    """Center crop placed as torchvision places it (`round((h - crop_h) / 2)`), so eval crops
    are pixel-aligned with timm's; albumentations' CenterCrop rounds down instead. Pads with
    zeros where the image is smaller, as torchvision does."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__(p=1.0)
        self.height, self.width = height, width

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        h, w = img.shape[:2]
        if h < self.height or w < self.width:
            dy, dx = max(self.height - h, 0), max(self.width - w, 0)
            img = cv2.copyMakeBorder(
                img, dy // 2, dy - dy // 2, dx // 2, dx - dx // 2, cv2.BORDER_CONSTANT, value=0
            )
            h, w = img.shape[:2]
        top, left = int(round((h - self.height) / 2)), int(round((w - self.width) / 2))
        return img[top : top + self.height, left : left + self.width]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width")


class ImageTransform:
    """Picklable callable: numpy H x W x 3 uint8 -> CHW float32 tensor of a fixed size."""

    def __init__(self, transforms: list[A.BasicTransform], out_hw: tuple[int, int]) -> None:
        self.compose = A.Compose(transforms)
        self.out_hw = out_hw

    def set_random_seed(self, seed: int) -> None:
        """Reseed augmentations (each DataLoader worker needs its own stream)."""
        self.compose.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        try:
            out = self.compose(image=image)["image"]
        except CropSizeError as e:  # e.g. RandomCrop(224) on a 200-px image
            raise DataError(
                f"data.augment cannot crop a {image.shape[0]}x{image.shape[1]} image: {e}; "
                "use RandomResizedCrop, or pad_if_needed: true"
            ) from e
        if tuple(out.shape[1:]) != self.out_hw:
            raise ConfigError(
                f"data.augment produced a {tuple(out.shape[1:])} image, expected {self.out_hw}: "
                "a transform after the crop/resize changed the size; end data.augment with "
                "RandomResizedCrop, RandomCrop, CenterCrop or Resize"
            )
        return out

    def __repr__(self) -> str:
        return f"ImageTransform({[type(t).__name__ for t in self.compose.transforms]})"


def _input_hw(data_config: Mapping[str, Any]) -> tuple[int, int]:
    _, h, w = data_config["input_size"]
    return int(h), int(w)


def _interpolation(data_config: Mapping[str, Any]) -> int:
    name = data_config.get("interpolation") or "bilinear"
    if name not in _INTERPOLATION:
        raise ConfigError(f"unknown interpolation '{name}'; valid: {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


def _normalise(data_config: Mapping[str, Any]) -> list[A.BasicTransform]:
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def _resize_and_crop(data_config: Mapping[str, Any]) -> list[A.BasicTransform]:
    """timm's eval geometry; INTER_AREA whenever the image shrinks (sharper and faster)."""
    h, w = _input_hw(data_config)
    crop_pct = data_config.get("crop_pct") or 0.875
    scaled = (int(h / crop_pct), int(w / crop_pct))
    resize = {"interpolation": _interpolation(data_config), "area_for_downscale": "image"}
    crop = CenterCrop(h, w)
    mode = data_config.get("crop_mode") or "center"
    if mode == "center":  # shorter side to scaled size (both sides at least, if not square)
        return [A.SmallestMaxSize(max_size_hw=scaled, **resize), crop]
    if mode == "squash":
        return [A.Resize(*scaled, **resize), crop]
    if mode == "border":  # whole image fits, padded with the mean colour
        fill = tuple(round(255 * m) for m in data_config["mean"])
        pad = A.PadIfNeeded(h, w, border_mode=cv2.BORDER_CONSTANT, fill=fill)
        return [A.LongestMaxSize(max_size_hw=scaled, **resize), pad, crop]
    raise ConfigError(f"unknown crop_mode '{mode}'; valid: center, squash, border")


def eval_transform(data_config: Mapping[str, Any]) -> ImageTransform:
    """Deterministic transform for embedding: timm's resize + center crop, then normalise."""
    return ImageTransform(
        _resize_and_crop(data_config) + _normalise(data_config), _input_hw(data_config)
    )


def _build_one(spec: Mapping[str, Any], hw: tuple[int, int]) -> tuple[A.BasicTransform, bool]:
    """One augmentation from `{name, args}`; also says whether it is a crop or resize."""
    name, args = spec.get("name"), dict(spec.get("args") or {})
    cls = getattr(A, str(name), None)
    if name in _ADDED_BY_US:
        raise ConfigError(f"data.augment: remove '{name}', it is added after the augmentations")
    if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        raise ConfigError(
            f"unknown albumentations transform '{name}'; see https://albumentations.ai/docs"
        )
    params = inspect.signature(cls).parameters
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ConfigError(
            f"albumentations {name}: unknown args {unknown}; valid args: {', '.join(params)}"
        )
    sizer = False
    # Crops and resizes take their output size from the model unless the config gives one.
    if "size" in params and params["size"].default is inspect.Parameter.empty:
        args.setdefault("size", hw)
        sizer = True
    elif {"height", "width"} <= set(params) and params["height"].default is inspect.Parameter.empty:
        args.setdefault("height", hw[0])
        args.setdefault("width", hw[1])
        sizer = True
    try:
        transform = cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"albumentations {name}: bad args {args}: {e}") from e
    return transform, sizer


def train_transform(
    data_config: Mapping[str, Any], augment: Sequence[Mapping[str, Any]] | None = None
) -> ImageTransform:
    """Augmentations named in the config, then (if none fixed the size) resize + center crop.

    `augment=None` means `DEFAULT_AUGMENT`; `[]` means no augmentation.
    """
    augment = DEFAULT_AUGMENT if augment is None else augment
    hw = _input_hw(data_config)
    out_hw, transforms = None, []
    for spec in copy.deepcopy(list(augment)):
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"data.augment entries need a name (and args): got {spec!r}")
        transform, sizer = _build_one(spec, hw)
        transforms.append(transform)
        if sizer and transform.p >= 1:
            out_hw = _sized(transform)
        elif sizer or spec["name"] in _CHANGE_SIZE:  # size now varies from image to image
            out_hw = None
    if out_hw is None:
        transforms += _resize_and_crop(data_config)
        out_hw = hw
    return ImageTransform(transforms + _normalise(data_config), out_hw)


def _sized(transform: A.BasicTransform) -> tuple[int, int]:
    size = getattr(transform, "size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    return int(transform.height), int(transform.width)
