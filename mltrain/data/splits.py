"""Train / held-out splits, saved as JSON so that evaluation reuses exactly the same images.

Kinds: `per_class` (every class on both sides: closed-set retrieval), `class_disjoint` (held-out
classes never seen in training: the usual metric-learning protocol) and `none` (every image
is both query and gallery, for a fixed catalogue). Splits use their own seeded generator, so
they do not depend on (or disturb) the global RNG.

A class_disjoint split can be three-way (`val_fraction`): validation classes, taken from the
training side, pick the best checkpoint, and the test classes (`heldout`) are only reported
on. The test classes are those of the two-way split with the same seed and train_fraction,
so a run with validation classes and an untrained backbone evaluate the same classes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mltrain.data.folder import ImageFolder
from mltrain.errors import ConfigError, DataError

SPLIT_KINDS = ("per_class", "class_disjoint", "none")


@dataclass
class Split:
    """Indices into an `ImageFolder`; `train`, `heldout` (the test side) and `val` (validation
    classes of a three-way class_disjoint split; empty otherwise) are sorted int64 arrays."""

    train: np.ndarray
    heldout: np.ndarray
    kind: str
    seed: int
    train_fraction: float
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    val_fraction: float = 0.0

    @property
    def selection(self) -> np.ndarray:
        """The images best.pt is chosen on: the validation side when there is one."""
        return self.val if len(self.val) else self.heldout


def _n_train(fraction: float, n: int) -> int:
    # At least one on each side when there are two or more.
    return 1 if n < 2 else min(max(round(fraction * n), 1), n - 1)


def disjoint_train_classes(fraction: float, n: int) -> int:
    """Training classes of a class_disjoint split: `fraction` of them, kept to 2 or more on
    each side (a metric loss needs negatives; held-out retrieval needs 2 classes)."""
    if n < 4:
        raise DataError(
            f"data.split class_disjoint needs at least 4 classes (2 or more on each side), "
            f"found {n}; use data.split=per_class, or add classes"
        )
    return min(max(round(fraction * n), 2), n - 2)


def disjoint_note(fraction: float, n: int) -> str | None:
    """What a class_disjoint split changed from data.train_fraction, if anything."""
    used = disjoint_train_classes(fraction, n)
    if used == round(fraction * n):
        return None
    return (f"data.train_fraction {fraction} of {n} classes would leave fewer than 2 on one "
            f"side; training on {used} classes, {n - used} held out")  # fmt: skip


# data.val_fraction auto: this share of the classes validates, when that makes 3 or more
AUTO_VAL_FRACTION = 0.15
AUTO_VAL_MIN_CLASSES = 3


def val_classes(val_fraction: float | str, n: int, n_train: int) -> int:
    """Validation classes of a class_disjoint split of `n` classes whose non-test side holds
    `n_train`: `val_fraction` of all `n` (so train_fraction keeps meaning "not test"), 2 or
    more, leaving 2 or more to train on. `auto`: AUTO_VAL_FRACTION where that gives at least
    AUTO_VAL_MIN_CLASSES and leaves 2 to train, else none."""
    if val_fraction == "auto":
        auto = round(AUTO_VAL_FRACTION * n)
        return auto if auto >= AUTO_VAL_MIN_CLASSES and n_train - auto >= 2 else 0
    if float(val_fraction) <= 0:
        return 0
    n_val = max(round(float(val_fraction) * n), 2)
    if n_train - n_val < 2:
        raise DataError(
            f"data.val_fraction {val_fraction} of {n} classes asks for {n_val} validation classes "
            f"out of the {n_train} that are not test classes, leaving fewer than 2 to train on; "
            "lower data.val_fraction, raise data.train_fraction, or set data.val_fraction=0"
        )
    return n_val


def make_split(labels: np.ndarray, kind: str, train_fraction: float, seed: int,
               val_fraction: float | str = 0.0) -> Split:  # fmt: skip
    """Split image indices by `kind`; deterministic for a given `seed`. `val_fraction` (of
    the classes; class_disjoint only) moves validation classes out of the training side."""
    labels = np.asarray(labels, dtype=np.int64)
    if kind not in SPLIT_KINDS:
        raise ConfigError(f"unknown split kind '{kind}'; valid kinds: {', '.join(SPLIT_KINDS)}")
    if kind == "none":
        everything = np.arange(len(labels), dtype=np.int64)
        return Split(everything, everything.copy(), kind, seed, float(train_fraction))
    if not 0.0 < float(train_fraction) < 1.0:
        raise ConfigError(
            f"split train_fraction {train_fraction} must be strictly between 0 and 1 "
            f"(e.g. 0.5) for split kind '{kind}'"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    val = np.zeros(0, dtype=np.int64)
    n_val = 0
    if kind == "per_class":
        train_parts = []
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            train_parts.append(idx[: _n_train(train_fraction, len(idx))])
        train = np.concatenate(train_parts) if train_parts else np.empty(0, np.int64)
    else:
        shuffled = rng.permutation(classes)
        n_train = disjoint_train_classes(train_fraction, len(classes))
        n_val = val_classes(val_fraction, len(classes), n_train)
        # The test classes stay shuffled[n_train:], whatever val_fraction: the two-way split's.
        train = np.flatnonzero(np.isin(labels, shuffled[: n_train - n_val]))
        val = np.flatnonzero(np.isin(labels, shuffled[n_train - n_val : n_train]))
    train = np.sort(train).astype(np.int64)
    heldout = np.setdiff1d(np.arange(len(labels), dtype=np.int64), np.union1d(train, val))
    fraction = n_val / len(classes) if n_val else 0.0
    return Split(train, heldout, kind, int(seed), float(train_fraction), val.astype(np.int64),
                 fraction)  # fmt: skip


def entries(indices: np.ndarray, folder: ImageFolder) -> list[list[str]]:
    """[relative path, class name] of each image: how split.json names an image."""
    return [
        [folder.paths[i].relative_to(folder.root).as_posix(), folder.classes[folder.labels[i]]]
        for i in indices
    ]


def split_doc(split: Split, folder: ImageFolder) -> dict:
    """`split` as `save_split` writes it, with paths relative to the data root."""
    return {
        "kind": split.kind,
        "seed": split.seed,
        "train_fraction": split.train_fraction,
        "val_fraction": split.val_fraction,
        "train": entries(split.train, folder),  # [relative path, class name]
        "val": entries(split.val, folder),  # validation: picks best.pt, never trained on
        "heldout": entries(split.heldout, folder),  # test (or held-out images)
    }


def save_split(path: str | os.PathLike, split: Split, folder: ImageFolder) -> None:
    """Write `split` as JSON with paths relative to the data root (portable across machines)."""
    doc = split_doc(split, folder)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, ensure_ascii=False))


def load_split(path: str | os.PathLike, folder: ImageFolder) -> Split:
    """Read a split saved by `save_split` and map it onto `folder`, which must hold its images."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        sides = {side: [(str(p), str(c)) for p, c in doc.get(side, [])]
                 for side in ("train", "heldout", "val")}  # fmt: skip
        if "train" not in doc or "heldout" not in doc:
            raise KeyError("train" if "train" not in doc else "heldout")
        kind, seed, fraction = doc["kind"], doc["seed"], doc["train_fraction"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing, not JSON, wrong shape
        raise DataError(f"cannot read split file {path}: {e}; delete it to make a new split") from e
    index = {p.relative_to(folder.root).as_posix(): i for i, p in enumerate(folder.paths)}
    missing: list[str] = []
    relabelled: list[str] = []
    out: dict[str, np.ndarray] = {}
    for side, entries in sides.items():
        found = []
        for rel, cls in entries:
            i = index.get(rel)
            if i is None:
                missing.append(rel)
            elif folder.classes[folder.labels[i]] != cls:
                relabelled.append(rel)
            else:
                found.append(i)
        out[side] = np.asarray(sorted(found), dtype=np.int64)
    bad = missing or relabelled
    if bad:
        what = "are not in" if missing else "have another class in"
        raise DataError(
            f"split file {path} lists {len(bad)} images that {what} data root {folder.root} "
            f"(e.g. {', '.join(bad[:3])}); restore the images, or delete {path} to make a new split"
        )
    return Split(out["train"], out["heldout"], kind, int(seed), float(fraction), out["val"],
                 float(doc.get("val_fraction", 0.0)))  # fmt: skip


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_duplicates(
    paths: list[Path], train_idx: np.ndarray, heldout_idx: np.ndarray
) -> list[tuple[str, str]]:
    """(train path, held-out path) pairs of byte-identical files: they leak into evaluation.

    Only files whose size occurs on both sides are hashed, so this is cheap on real data.
    """
    sizes = {int(i): os.path.getsize(paths[i]) for i in np.concatenate([train_idx, heldout_idx])}
    common = {sizes[int(i)] for i in train_idx} & {sizes[int(i)] for i in heldout_idx}
    digest: dict[int, str] = {}

    def by_hash(indices: np.ndarray) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i in map(int, indices):
            if sizes[i] in common:
                digest.setdefault(i, _sha1(Path(paths[i])))
                groups[digest[i]].append(i)
        return groups

    train_groups, held_groups = by_hash(train_idx), by_hash(heldout_idx)
    pairs = [
        (str(paths[a]), str(paths[b]))
        for h in sorted(train_groups.keys() & held_groups.keys())
        for a in train_groups[h]
        for b in held_groups[h]
        if a != b  # split kind 'none' puts each image on both sides
    ]
    return sorted(pairs)


def duplicates_within(paths: list[Path], indices: np.ndarray) -> list[tuple[int, int]]:
    """(copy, original) index pairs of byte-identical files among `indices`: on an evaluated
    side each copy finds its twin as a perfect hit. The original is the first in `indices`
    order; only files whose size repeats are hashed, so this is cheap on real data."""
    sizes: dict[int, list[int]] = defaultdict(list)
    for i in map(int, indices):
        sizes[os.path.getsize(paths[i])].append(i)
    pairs = []
    for same_size in sizes.values():
        if len(same_size) < 2:
            continue
        first: dict[str, int] = {}
        for i in same_size:
            original = first.setdefault(_sha1(Path(paths[i])), i)
            if original != i:
                pairs.append((i, original))
    return sorted(pairs)
