"""Batch samplers by name. Pair and triplet losses need positives in every batch: `m_per_class`
puts `m` images of each of `batch_size / m` classes in each batch; `random` just shuffles.
On nested data (`alphabet/character`) `m_per_class` can also draw each batch's classes from
a few parent folders (`parents`), so that the negatives are the near look-alikes a
within-parent one-shot episode asks the model to tell apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from torch.utils.data import Sampler

from mltrain.data.labelled import listing
from mltrain.errors import ConfigError, DataError
from mltrain.registry import Registry
from mltrain.text import counted

SAMPLERS = Registry("sampler")


class SeededMPerClassSampler(MPerClassSampler):
    """MPerClassSampler drawing from its own RNG instead of numpy's global one, so the batch
    order is reproducible for a seed and does not depend on other users of np.random."""

    def __init__(self, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = np.random.RandomState(seed)

    def __iter__(self):
        # pml draws from the module-level `NUMPY_RANDOM`; swap ours in while the epoch's
        # index list is built (it is built eagerly, in the main process).
        saved, pml_common.NUMPY_RANDOM = pml_common.NUMPY_RANDOM, self.rng
        try:
            return super().__iter__()
        finally:
            pml_common.NUMPY_RANDOM = saved


class ParentBatchSampler(Sampler[int]):
    """m images of each of batch_size/m classes per batch, the classes drawn from `parents`
    parent folders, a folder as likely as its share of the classes (one with too few classes
    is topped up from the next one drawn).

    Like pml's sampler, a class with fewer than m images repeats some of them, and an epoch
    holds about as many images as there are."""

    def __init__(self, labels: np.ndarray, groups: np.ndarray, m: int, batch_size: int,
                 parents: int, seed: int | None) -> None:  # fmt: skip
        self.m, self.batch, self.parents = m, batch_size, parents
        self.by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        group_of = {c: int(groups[idx[0]]) for c, idx in self.by_class.items()}
        self.by_group = [np.array([c for c, g in group_of.items() if g == k])
                         for k in sorted(set(group_of.values()))]  # fmt: skip
        sizes = np.array([len(g) for g in self.by_group], dtype=float)
        self.weights = sizes / sizes.sum()  # each class as likely as under pml's sampler
        self.n_batches = len(labels) // batch_size
        self.rng = np.random.default_rng(seed)

    def _batch(self) -> list[int]:
        want = self.batch // self.m
        chosen: list[int] = []
        order = self.rng.choice(len(self.by_group), len(self.by_group), replace=False,
                                p=self.weights)  # fmt: skip
        # first up to a share of the classes from each parent drawn; where small parents leave
        # the batch short, the parents drawn first give more
        for cap in (-(-want // self.parents), want):
            for k in order:
                left = min(cap, want - len(chosen))
                free = np.setdiff1d(self.by_group[k], chosen)
                if left <= 0 or not len(free):
                    continue
                chosen += self.rng.choice(free, min(left, len(free)), replace=False).tolist()
        out = []
        for c in chosen:
            idx = self.by_class[c]
            out += self.rng.choice(idx, self.m, replace=len(idx) < self.m).tolist()
        return out

    def __iter__(self):
        return iter([i for _ in range(self.n_batches) for i in self._batch()])

    def __len__(self) -> int:
        return self.n_batches * self.batch


@SAMPLERS.register("random")
def random_sampler(labels: Any = None, batch_size: Any = None, seed: Any = None,
                   groups: Any = None) -> None:  # fmt: skip
    """No sampler: the loader shuffles. It takes what every sampler is given, and no
    arguments of its own, so a misplaced one (`args: {m: 4}`) is an error, not ignored."""
    return None


class _Subset(Sampler[int]):
    """A sampler over some of the images, yielding their indices in the whole list."""

    def __init__(self, inner: Sampler[int], keep: np.ndarray) -> None:
        self.inner, self.keep = inner, keep

    def __iter__(self):
        return (int(self.keep[i]) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def paired(labels: np.ndarray) -> np.ndarray:
    """Indices of the images whose class has at least 2 of them: only those can form a positive
    pair, so balanced batches draw from them alone."""
    ids, counts = np.unique(labels, return_counts=True)
    return np.flatnonzero(np.isin(labels, ids[counts >= 2]))


@SAMPLERS.register("m_per_class")
def m_per_class_sampler(
    labels: np.ndarray,
    batch_size: int,
    m: int = 4,
    seed: int | None = None,
    parents: int | None = None,
    groups: np.ndarray | None = None,
) -> Sampler:
    """m images of each of batch_size/m classes per batch. Classes with a single training image
    are left out (`fit_batch_size` notes which): they have no positive to pair with.

    `parents`: draw each batch's classes from this many parent folders (`groups` gives each
    image's), for negatives as alike as the within-parent one-shot episodes; None: anywhere."""
    labels = np.asarray(labels, dtype=np.int64)
    if m < 1 or batch_size % m or batch_size < 2 * m:
        raise ConfigError(
            f"sampler m_per_class: batch_size {batch_size} must be a multiple of m {m} and at "
            f"least 2*m = {2 * m} (each batch holds batch_size/m classes)"
        )
    keep = paired(labels)
    ids = np.unique(labels[keep])
    if len(ids) < 2:
        raise DataError(
            f"{len(ids)} of {len(np.unique(labels))} classes have 2 or more training images; "
            "pair and triplet losses need at least 2 such classes: add images, or use the "
            "random sampler with a proxy loss (configs/pooling.yaml)"
        )
    if len(ids) * m < batch_size:
        raise ConfigError(
            f"sampler m_per_class: {len(ids)} classes x m {m} = {len(ids) * m} images cannot "
            f"fill a batch of {batch_size}; lower batch_size or raise m"
        )
    if len(keep) < batch_size:
        raise ConfigError(
            f"sampler m_per_class: {len(keep)} training images are fewer than batch_size "
            f"{batch_size}; lower batch_size"
        )
    if parents is not None:
        inner = ParentBatchSampler(labels[keep], _checked_groups(groups, parents, keep), m,
                                   batch_size, parents, seed)  # fmt: skip
    else:
        inner = SeededMPerClassSampler(
            labels[keep], m, batch_size=batch_size, length_before_new_iter=len(keep), seed=seed
        )
    return inner if len(keep) == len(labels) else _Subset(inner, keep)


def _checked_groups(groups: np.ndarray | None, parents: Any, keep: np.ndarray) -> np.ndarray:
    """Each kept image's parent folder, once `parents` is known to make sense for them."""
    _whole("parents", parents, " or null")
    found = 0 if groups is None else len(np.unique(np.asarray(groups)[keep]))
    if found < 2:
        raise ConfigError(
            f"train.sampler.args.parents {parents}: the training classes sit in "
            f"{counted(found, 'parent folder')}; it needs nested data (<parent>/<class>/<image>) "
            "with two or more parents: remove train.sampler.args.parents"
        )
    return np.asarray(groups)[keep]


def fit_batch_size(
    spec: Mapping[str, Any] | str, labels: np.ndarray, batch_size: int,
    class_names: Sequence[str] = (),
) -> tuple[int, list[str]]:
    """The batch size the training images can fill, and notes on what was adapted.

    m_per_class batches hold m images of batch_size/m classes: with 3 classes and m=4 a batch
    of 64 cannot be filled, so it becomes 12 (a multiple of m, within the classes and images).
    Classes with one training image are left out of such batches, and noted; classes with
    fewer than m repeat images within a batch, also noted. Other samplers
    shrink to the number of images, since full batches only are trained.
    """
    spec = {"name": spec} if isinstance(spec, str) else spec
    labels = np.asarray(labels)
    notes = []
    if spec.get("name") == "m_per_class":
        keep = paired(labels)
        lone = [_name(c, class_names) for c in np.unique(np.delete(labels, keep))]
        if lone and len(keep):
            what = "1 class" if len(lone) == 1 else f"{len(lone)} classes"
            notes.append(f"{what} with a single training image sit out the "
                         f"balanced batches (no positive to pair with): {listing(lone)}; their "
                         "held-out images, if any, are still evaluated")  # fmt: skip
        labels = labels[keep]
        m = sampler_m(spec)
        notes += _repeat_note(labels, m, class_names)
        fits = _balanced_fit(labels, m)
        if fits < 2 * m and len(np.unique(labels)) >= 2:
            raise ConfigError(_smaller_m_advice(labels, m))
        n = len(labels)
        if batch_size <= fits or fits < 2 * m:  # fits, or cannot: the sampler's error explains
            return batch_size, notes
        why = (f"{fits // m} classes x m {m} per batch, from {n} training images in "
               f"{len(np.unique(labels))} classes")  # fmt: skip
    else:
        fits = len(labels)
        if batch_size <= fits:
            return batch_size, notes
        why = f"{fits} training images"
    notes.append(f"train.batch_size {batch_size} lowered to {fits} to fit the data ({why})")
    return fits, notes


def _name(label: int, class_names: Sequence[str]) -> str:
    return str(class_names[label]) if len(class_names) > label else str(label)


def _repeat_note(labels: np.ndarray, m: int, class_names: Sequence[str]) -> list[str]:
    """pml's sampler draws m images of a class with replacement: a class with fewer than m
    repeats some of them in a batch (each copy augmented anew). Said, not silent."""
    ids, counts = np.unique(labels, return_counts=True)
    short = [_name(c, class_names) for c in ids[counts < m]]
    if not short:
        return []
    what = "1 class has" if len(short) == 1 else f"{len(short)} classes have"
    return [f"{what} fewer than m={m} training images, so their images repeat within a batch "
            f"(each copy augmented anew): {listing(short)}; lower train.sampler.args.m to "
            "avoid it"]  # fmt: skip


def sampler_m(spec: Mapping[str, Any]) -> int:
    """The m of an m_per_class spec, checked: a positive whole number."""
    return _whole("m", (spec.get("args") or {}).get("m", 4))


def _whole(key: str, value: Any, also: str = "") -> int:
    """`value` of `train.sampler.args.<key>`, checked: a positive whole number."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"train.sampler.args.{key} must be a positive whole number{also}, "
                          f"got {value!r}")  # fmt: skip
    return int(value)


def _balanced_fit(labels: np.ndarray, m: int) -> int:
    """The largest m_per_class batch these labels fill: a multiple of m, at most m images of
    each class and no more images than there are."""
    return min(len(np.unique(labels)) * m, len(labels) // m * m)


def _smaller_m_advice(labels: np.ndarray, m: int) -> str:
    """Why no batch of 2 or more classes x m fits, and the largest m that would."""
    ids, counts = np.unique(labels, return_counts=True)
    ok = [k for k in range(m - 1, 0, -1) if _balanced_fit(labels, k) >= 2 * k]
    whole = [k for k in ok if k <= counts.min()]  # no class repeats an image in a batch
    ok = whole or ok
    hint = f"lower m: --set train.sampler.args.m={ok[0]}" if ok else "add training images"
    return (f"sampler m_per_class: m {m} needs batches of at least {2 * m} images, m from each "
            f"of 2 or more classes, but the {len(labels)} training images that can pair "
            f"({len(ids)} classes, {counts.min()}-{counts.max()} each) fill at most "
            f"{_balanced_fit(labels, m)}; {hint}")  # fmt: skip


def build_sampler(
    spec: Mapping[str, Any] | str,
    labels: np.ndarray,
    batch_size: int,
    seed: int | None = None,
    groups: np.ndarray | None = None,
) -> Sampler | None:
    """Sampler from `{name, args}` (or a bare name); None means 'let the loader shuffle'.
    `groups`: each image's parent folder as a number, for samplers that batch by parent."""
    if isinstance(spec, str):
        spec = {"name": spec}
    extra: dict[str, Any] = {"labels": labels, "batch_size": batch_size, "groups": groups}
    if seed is not None:
        extra["seed"] = seed
    return SAMPLERS.build(spec, **extra)
