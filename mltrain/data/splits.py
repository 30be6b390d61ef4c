"""Train / held-out splits, saved as JSON so that evaluation reuses exactly the same images.

Kinds: `per_class` (every class on both sides: closed-set retrieval), `class_disjoint` (held-out
classes never seen in training: the usual metric-learning protocol) and `none` (every image
is both query and gallery, for a fixed catalogue). Splits use their own seeded generator, so
they do not depend on (or disturb) the global RNG.

A class_disjoint split can be three-way (`val_fraction`): validation classes, taken from the
training side, pick the best checkpoint, and the test classes (`heldout`) are only reported
on. The test classes are those of the two-way split with the same seed and train_fraction,
so a run with validation classes and an untrained backbone evaluate the same classes.

`split_by: parent` makes a class_disjoint split put whole parent folders on one side (the
alphabets of Omniglot's `alphabet/character/`), as the one-shot protocol needs: test
characters from alphabets never trained on. The class counts of train_fraction and
val_fraction are met as closely as whole parents allow (see `parent_split`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mltrain.data.labelled import ImageFolder, listing, natural_key
from mltrain.errors import ConfigError, DataError
from mltrain.text import counted

SPLIT_KINDS = ("per_class", "class_disjoint", "none")
SPLIT_BY = ("class", "parent")  # what a class_disjoint split shuffles to sides


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
    split_by: str = "class"  # parent: whole parent folders on each side (class_disjoint)

    @property
    def selection(self) -> np.ndarray:
        """The images best.pt is chosen on: the validation side when there is one."""
        return self.val if len(self.val) else self.heldout

    @property
    def selection_side(self) -> str:
        """What `selection` is, as messages name it: the test classes are only evaluated
        afterwards, so figures scored during training are validation ones where there are any."""
        return "validation" if len(self.val) else "held-out"


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
               val_fraction: float | str = 0.0,
               parents: Sequence[str] | None = None) -> Split:  # fmt: skip
    """Split image indices by `kind`; deterministic for a given `seed`. `val_fraction` (of
    the classes; class_disjoint only) moves validation classes out of the training side.
    `parents` (class_disjoint only): each class's parent folder, indexed by label; whole
    parents then go to one side (`data.split_by: parent`)."""
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
    elif parents is not None:
        train_classes, val_side = parent_split(classes, parents, train_fraction, val_fraction,
                                               rng)  # fmt: skip
        train = np.flatnonzero(np.isin(labels, train_classes))
        val = np.flatnonzero(np.isin(labels, val_side))
        n_val = len(val_side)
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
    by = "parent" if parents is not None and kind == "class_disjoint" else "class"
    return Split(train, heldout, kind, int(seed), float(train_fraction), val.astype(np.int64),
                 fraction, by)  # fmt: skip


def parent_of(name: str) -> str:
    """The folder above class `name` (`Greek/character01`: `Greek`); "" for a top-level class."""
    return name.rpartition("/")[0]


def parent_split(classes: np.ndarray, parents: Sequence[str], train_fraction: float,
                 val_fraction: float | str, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(training classes, validation classes) of a class_disjoint split that keeps each parent
    folder on one side. The parents are shuffled; the first ones, as many as bring the test
    classes closest to (1 - train_fraction) of all, are the test side (whatever val_fraction,
    as in the class split); the next ones closest to val_fraction validate; the rest train.
    Each side keeps 2 or more classes."""
    groups = _parent_groups(classes, parents)
    names = sorted(groups, key=natural_key)
    order = [names[i] for i in rng.permutation(len(names))]
    sizes = [len(groups[g]) for g in order]
    n = len(classes)
    k = _closest_prefix(sizes, (1 - float(train_fraction)) * n)
    if k is None:
        raise DataError(
            f"data.split_by parent: {counted(len(names), 'parent folder')} ({listing(names, 3)}) "
            "cannot make training and test sides of 2 or more classes each from whole parents; "
            "add parent folders, or set data.split_by=class"
        )
    n_val = val_classes(val_fraction, n, n - sum(sizes[:k]))
    j = _closest_prefix(sizes[k:], n_val) if n_val else 0
    if j is None and val_fraction == "auto":
        j = 0  # no validation side; `validation_note` says so
    elif j is None:
        rest = order[k:]
        raise DataError(
            f"data.split_by parent: the {counted(len(rest), 'parent folder')} left beside the "
            f"test side ({listing(rest, 3)}) cannot make validation and training sides of 2 or "
            "more classes each; set data.val_fraction=0, or data.split_by=class"
        )
    return _members(groups, order[k + j :]), _members(groups, order[k : k + j])


def _members(groups: dict[str, np.ndarray], picked: list[str]) -> np.ndarray:
    return np.concatenate([groups[g] for g in picked] or [np.zeros(0, np.int64)])


def _parent_groups(classes: np.ndarray, parents: Sequence[str]) -> dict[str, np.ndarray]:
    """Classes by parent folder, or a DataError naming classes with no parent."""
    groups: dict[str, list[int]] = {}
    for c in classes:
        groups.setdefault(str(parents[int(c)]), []).append(int(c))
    loose = groups.pop("", [])
    if loose:
        raise DataError(
            f"data.split_by parent: {len(loose)} of {len(classes)} classes have no parent folder "
            "to group them by (they lie directly in the data root); nest classes as "
            "<parent>/<class>/<image> with data.class_depth auto, or set data.split_by=class"
        )
    return {g: np.asarray(members, dtype=np.int64) for g, members in groups.items()}


def _closest_prefix(sizes: list[int], target: float) -> int | None:
    """How many of `sizes`, taken in order, sum closest to `target` while both the taken and
    the remaining ones sum to 2 or more (the fewest on a tie); None where no count does."""
    total, taken, best = sum(sizes), 0, None
    for k in range(1, len(sizes)):
        taken += sizes[k - 1]
        if taken >= 2 and total - taken >= 2 and (
                best is None or abs(taken - target) < abs(best[1] - target)):  # fmt: skip
            best = (k, taken)
    return None if best is None else best[0]


def parents_by_side(split: Split, folder: ImageFolder) -> dict[str, list[str]]:
    """The parent folders on each side of `split`, sorted naturally (split.json's record of
    a `split_by: parent` split)."""
    def names(idx: np.ndarray) -> list[str]:
        found = {parent_of(folder.classes[c]) for c in np.unique(folder.labels[idx])}
        return sorted(found, key=natural_key)

    return {"train": names(split.train), "val": names(split.val), "heldout": names(split.heldout)}


def parents_note(split: Split, folder: ImageFolder) -> str:
    """Which parent folders each side of a `split_by: parent` split holds, in one line."""
    sides = parents_by_side(split, folder)
    labels = folder.labels

    def side(what: str, key: str, idx: np.ndarray) -> str:
        n = len(np.unique(labels[idx]))
        return f"{what} {listing(sides[key], 8)} ({n} classes)"

    parts = [side("test", "heldout", split.heldout)]
    if len(split.val):
        parts.append(side("validation", "val", split.val))
    parts.append(side("training", "train", split.train))
    return f"data.split_by parent: whole parent folders on each side: {'; '.join(parts)}"


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
        "split_by": split.split_by,
        **({"parents": parents_by_side(split, folder)} if split.split_by == "parent" else {}),
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
    by = str(doc.get("split_by", "class"))  # a split.json from before split_by: by class
    return Split(out["train"], out["heldout"], kind, int(seed), float(fraction), out["val"],
                 float(doc.get("val_fraction", 0.0)), by)  # fmt: skip


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
