"""Class augmentation (`data.class_augment`): a rotated or mirrored copy of every training class
becomes a class of its own.

Where a turned image shows another thing, not the same one (a character rotated by 90 degrees or
mirrored is another character), the copies multiply the classes a metric loss learns to tell
apart, and few training classes are what limits one-shot accuracy on a new domain. Few-shot
handwriting training has done this since Santoro et al. and Vinyals et al. (Omniglot's
rotations by multiples of 90 degrees). Only the training side is turned; validation and test
images are evaluated as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mltrain.config_schema import CLASS_TURNS

TURNS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rotate90": lambda a: np.rot90(a, 1),  # counter-clockwise, as numpy turns
    "rotate180": lambda a: np.rot90(a, 2),
    "rotate270": lambda a: np.rot90(a, 3),
    "mirror": lambda a: a[:, ::-1],
}
assert tuple(TURNS) == CLASS_TURNS  # the config checks the names against CLASS_TURNS


def turn(image: np.ndarray, name: str) -> np.ndarray:
    """`image` (H x W x C) turned by `name`; the empty name leaves it as it is."""
    return image if not name else np.ascontiguousarray(TURNS[name](image))


def turned_name(class_name: str, name: str) -> str:
    """The name of a class's turned copy, e.g. `Greek/character01 (rotate90)`."""
    return f"{class_name} ({name})"
