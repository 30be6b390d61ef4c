"""From a config to image lists, a recorded split and data loaders."""

from __future__ import annotations

import filecmp
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from mltrain import distributed
from mltrain.config import Config
from mltrain.data.class_augment import turned_name
from mltrain.data.dataset import ImageDataset, make_loader, worth_workers
from mltrain.data.images import check_images
from mltrain.data.labelled import ImageFolder
from mltrain.data.readers import read_images, readable_root
from mltrain.data.splits import (
    AUTO_VAL_FRACTION,
    AUTO_VAL_MIN_CLASSES,
    Split,
    disjoint_note,
    duplicates_within,
    entries,
    find_duplicates,
    make_split,
    parent_of,
    parents_note,
    save_split,
    split_doc,
)
from mltrain.data.transforms import eval_transform, train_transform
from mltrain.errors import DataError
from mltrain.runtime import resolve_device, usable_cpus, workers_can_run_model
from mltrain.text import counted


@dataclass
class RunData:
    """The images of a run: the folder, its split, and training labels made contiguous.

    The training items are the training images, once more for each `data.class_augment` turn
    (`train_rows`, `train_turns`), each turned copy of a class a class of its own."""

    folder: ImageFolder
    split: Split
    train_classes: list[str]  # classes trained on (turned copies last), by remapped label
    class_augment: tuple[str, ...] = ()

    @property
    def unturned_classes(self) -> int:
        """How many of `train_classes` are the folder's own (the rest are turned copies)."""
        return len(self.train_classes) // (1 + len(self.class_augment))

    @property
    def train_rows(self) -> np.ndarray:
        """Each training item's image (a row of `folder`): the training side, once per turn."""
        return np.tile(self.split.train, 1 + len(self.class_augment))

    @property
    def train_turns(self) -> list[str]:
        """Each training item's turn (`mltrain.data.class_augment`); "" leaves it as it is."""
        return [t for t in ("", *self.class_augment) for _ in self.split.train]

    @property
    def train_labels(self) -> np.ndarray:
        """Each training item's label in 0..len(train_classes)-1 (class_disjoint leaves gaps
        in the folder's labels); a turned copy's label follows all of the unturned ones."""
        original = self.folder.labels[self.split.train]
        n = self.unturned_classes
        # the unturned names only: a folder may also hold a class named "a (mirror)"
        lookup = {c: i for i, c in enumerate(self.train_classes[:n])}
        base = np.array([lookup[self.folder.classes[c]] for c in original], dtype=np.int64)
        return np.concatenate([base + k * n for k in range(1 + len(self.class_augment))])

    @property
    def train_groups(self) -> np.ndarray:
        """Each training image's parent folder as a number, for samplers that batch by it."""
        names = [parent_of(c) for c in self.train_classes]
        number = {p: i for i, p in enumerate(sorted(set(names)))}
        return np.array([number[p] for p in names], dtype=np.int64)[self.train_labels]

    def paths(self, idx: np.ndarray) -> list[Path]:
        return [self.folder.paths[i] for i in idx]


def prepare_data(cfg: Config, run_dir: Path | None = None, duplicates: bool = True,
                 resuming: bool = False) -> RunData:  # fmt: skip
    """Scan, check and split the data; writes `split.json` (and bad images) into `run_dir`.

    `duplicates`: warn about training images copied into the held-out side, and leave out
    byte-identical copies within the evaluated (held-out, validation) images. They only
    inflate held-out figures, so a command that reports none (export) passes False.
    `resuming`: the run's `split.json` must still describe the data (`check_same_split`)."""
    d = cfg.data
    folder = read_images(d.root, exclude=d.exclude_classes, class_depth=d.class_depth,
                         bad_images=d.bad_images)  # fmt: skip
    report_notes(folder.notes, run_dir)
    if cfg.data.check_images:
        folder = _drop_bad_images(folder, cfg, run_dir)
    val_fraction = d.val_fraction
    if resuming and run_dir is not None and _two_way(run_dir / "split.json"):
        val_fraction = d.val_fraction = 0.0  # a run from before validation classes: as it was
    parents = ([parent_of(c) for c in folder.classes]
               if d.split_by == "parent" and d.split == "class_disjoint" else None)  # fmt: skip
    split = make_split(folder.labels, d.split, d.train_fraction, cfg.seed, val_fraction, parents)
    if duplicates:
        split = _drop_evaluated_copies(folder, split, run_dir)
    if split.kind == "class_disjoint":
        _disjoint_notes(folder, split, d.train_fraction, val_fraction, run_dir)
    if len(split.train) == 0 or len(split.heldout) == 0:
        raise DataError(f"data.split {cfg.data.split} left an empty side; add images")
    if resuming and run_dir is not None:
        check_same_split(run_dir / "split.json", split, folder)
    elif run_dir is not None:
        save_split(run_dir / "split.json", split, folder)
    if duplicates and split.kind != "none":
        _report_duplicates(folder, split, run_dir)
    turns = tuple(d.class_augment)
    data = RunData(folder, split, _train_classes(folder, split, turns), turns)
    if turns and run_dir is not None:  # said once, by training (evaluate trains nothing)
        n = data.unturned_classes
        report_notes([f"data.class_augment {', '.join(turns)}: the {counted(n, 'training class')} "
                      f"and their turned copies train as {len(data.train_classes)} classes "
                      f"({len(data.train_rows)} images an epoch)"], run_dir)  # fmt: skip
    return data


def _disjoint_notes(folder: ImageFolder, split: Split, train_fraction: float,
                    val_fraction: float | str, run_dir: Path | None) -> None:  # fmt: skip
    """Say what a class_disjoint split did: the parents on each side (`split_by: parent`) or
    any change to train_fraction, and which classes choose best.pt. The notes naming the
    evaluated classes go into `folder.notes` too, so evaluate's report carries them."""
    if split.split_by == "parent":
        note = parents_note(split, folder)
        folder.notes.append(note)
    else:
        note = disjoint_note(train_fraction, len(np.unique(folder.labels)))
    report_notes([note] if note else [], run_dir)
    if len(split.val):  # without them, training says so (`validation_note`)
        note = validation_note(folder, split, val_fraction)
        report_notes([note], run_dir)
        folder.notes.append(note)


def _two_way(recorded: Path) -> bool:
    """Whether a run's split.json predates validation classes (it has no `val` side)."""
    try:
        return "val" not in json.loads(recorded.read_text())
    except (OSError, ValueError, TypeError):
        return False  # none yet, or unreadable: `check_same_split` says so


def validation_note(folder: ImageFolder, split: Split, asked: float | str) -> str:
    """Which classes choose best.pt and which are only reported on, for a class_disjoint
    split: validation classes when there are any, else the test classes themselves."""
    labels = folder.labels

    def side(idx: np.ndarray, what: str) -> str:
        return f"{len(np.unique(labels[idx]))} {what} classes ({len(idx)} images)"

    if len(split.val):
        return (f"data.val_fraction {asked}: {side(split.train, 'training')}; "
                f"{side(split.val, 'validation')} choose best.pt; {side(split.heldout, 'test')} "
                "are only evaluated (evaluate.py), never trained on or chosen on")  # fmt: skip
    why = ("too few classes for validation ones (auto needs "
           f"{round(AUTO_VAL_MIN_CLASSES / AUTO_VAL_FRACTION)} or so)" if asked == "auto"
           else "data.val_fraction 0")  # fmt: skip
    return (f"no validation classes ({why}): best.pt is chosen on the "
            f"{side(split.heldout, 'held-out')} that evaluate.py reports on, so its figures are "
            "optimistic; set data.val_fraction (e.g. 0.15) for a validation side")


def _train_classes(folder: ImageFolder, split: Split, turns: tuple[str, ...] = ()) -> list[str]:
    """The classes with training images, in folder order, then their turned copies, turn by
    turn (`RunData.train_labels` maps them)."""
    names = [folder.classes[c] for c in sorted({int(c) for c in folder.labels[split.train]})]
    return names + [turned_name(c, t) for t in turns for c in names]


def _drop_evaluated_copies(folder: ImageFolder, split: Split, run_dir: Path | None) -> Split:
    """Byte-identical copies within the evaluated images (held-out and validation sides) find
    each other as perfect hits and inflate every figure: keep the first of each, drop the
    others from that side (they still train where the split put them there), with a note."""
    dropped: list[str] = []
    sides = {}
    for name, idx in (("heldout", split.heldout), ("val", split.val)):
        pairs = duplicates_within(folder.paths, idx)
        sides[name] = np.setdiff1d(idx, [c for c, _ in pairs]).astype(np.int64)
        dropped += [f"  {folder.paths[c]}  ==  {folder.paths[o]}" + (
            "  (another class)" if folder.labels[c] != folder.labels[o] else "")
            for c, o in pairs]  # fmt: skip
    if not dropped:
        return split
    other = sum(line.endswith("(another class)") for line in dropped)
    where = _listed(dropped, run_dir, "duplicates_evaluated.txt")
    relabel = (f"; {other} of them copy an image of another class: check their labels"
               if other else "")  # fmt: skip
    note = (f"left out {len(dropped)} byte-identical copies of other evaluated images (each "
            f"would find its twin as a perfect hit){relabel}")  # fmt: skip
    if run_dir is not None:
        note += where  # " (listed in duplicates_evaluated.txt)"
    report_notes([note], run_dir)
    folder.notes.append(note)  # evaluate's report.md and metrics.json carry it too
    if run_dir is None:
        print(f"the copies{where}", file=sys.stderr)
    return replace(split, heldout=sides["heldout"], val=sides["val"])


def _report_duplicates(folder: ImageFolder, split: Split, run_dir: Path | None) -> None:
    """Byte-identical files on both sides of the split inflate held-out figures: say so."""
    pairs = find_duplicates(folder.paths, split.train, np.union1d(split.heldout, split.val))
    if not pairs:
        return
    lines = [f"  {a}  ==  {b}" for a, b in pairs]
    where = _listed(lines, run_dir, "duplicates.txt")
    print(
        f"warning: {len(pairs)} training images are byte-identical to held-out images; "
        f"delete the copies for honest held-out figures{where}",
        file=sys.stderr,
    )


def _listed(lines: list[str], run_dir: Path | None, name: str, shown: int = 3) -> str:
    """Where the full list is, as the end of a message: `name` in the run folder, or (no
    run folder: evaluate, export) the lines themselves, the first few of a long list."""
    if run_dir is not None:
        (run_dir / name).write_text("\n".join(lines) + "\n")
        return f" (listed in {name})"
    if len(lines) <= shown:
        return ":\n" + "\n".join(lines)
    more = f"\n  ... and {len(lines) - shown} more"
    return ", the first ones:\n" + "\n".join(lines[:shown]) + more


def _drop_bad_images(folder: ImageFolder, cfg: Config, run_dir: Path | None) -> ImageFolder:
    bad = check_images(folder.paths)
    if not bad:
        return folder
    lines = [f"  {path}: {reason}" for path, reason in bad]
    if cfg.data.bad_images == "error":
        kept = ""
        if run_dir is not None:  # the run folder keeps the list and its config (README)
            (run_dir / "bad_images.txt").write_text("\n".join(lines) + "\n")
            kept = f" (listed in {run_dir / 'bad_images.txt'})"
        raise DataError(
            f"{len(bad)} unreadable images under {folder.root}{kept}:\n" + "\n".join(lines) + "\n"
            "fix or delete them, or set data.bad_images: skip to leave them out"
        )
    where = _listed(lines, run_dir, "bad_images.txt")
    plural = "" if len(bad) == 1 else "s"
    print(f"skipping {len(bad)} unreadable image{plural}{where}", file=sys.stderr)
    bad_paths = {str(p) for p, _ in bad}
    keep = [i for i, p in enumerate(folder.paths) if str(p) not in bad_paths]
    return ImageFolder(
        root=folder.root,
        paths=[folder.paths[i] for i in keep],
        labels=folder.labels[keep],
        classes=folder.classes,
        notes=folder.notes,
    )


def check_same_split(recorded: Path, split: Split, folder: ImageFolder) -> None:
    """A resumed run must train and evaluate on the images it started with: had images been
    added, removed or relabelled since, the new split would move some held-out images into
    training, and the held-out figures before and after the resume would measure different
    images. `recorded` is the run's split.json (runs from before it existed are not checked)."""
    try:
        doc = json.loads(recorded.read_text())
        sides = ("train", "heldout", "val") if "val" in doc else ("train", "heldout")
        old = {side: {tuple(e) for e in doc[side]} for side in sides}
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--resume: cannot read {recorded} ({e}); it records the run's "
                        "split, so the run cannot continue exactly: start a new run") from None
    current = split_doc(split, folder)
    now = {side: {tuple(e) for e in current[side]} for side in old}
    if now != old:
        before, after = set().union(*old.values()), set().union(*now.values())
        if before == after:  # the same images, sided differently: the split rule changed
            raise DataError(
                f"--resume: the images are those the run started with, but this version of "
                f"mltrain splits them differently from {recorded}; resume with the version that "
                "started the run, or start a new run"
            )
        # Gone: no longer in the folder at all (an image left out as a copy of a new one
        # is still there); new: on a side of the split now and not before.
        present = {tuple(e) for e in entries(np.arange(len(folder.paths)), folder)}
        raise DataError(
            f"--resume: the images under {folder.root} changed since the run started "
            f"({len(before - present)} gone or relabelled, {len(after - before)} new, against "
            f"{recorded}); restore them, or start a new run"
        )


def trained_on(recorded: Path, split: Split, folder: ImageFolder) -> np.ndarray:
    """The held-out rows of `split` (indices into `folder`) that the run whose split.json is
    `recorded` trained on, or chose its best.pt on (its validation side). A changed folder
    (images added, a class renamed) or another split rule re-splits the images, and some of
    the run's training images would be scored as held-out; none for a run without split.json.

    A path is the run's image when the folder is the run's own, or holds the same bytes as
    the run's file there (other data may reuse names like `0/1.png`); when the run's folder
    can no longer be read (it moved), the path alone decides."""
    try:
        doc = json.loads(recorded.read_text())
        trained = {entry[0] for entry in [*doc["train"], *doc.get("val", [])]}
    except FileNotFoundError:
        return np.zeros(0, dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"cannot read {recorded} ({e}); it lists the images the run trained "
                        "on, to keep them out of the held-out figures") from None  # fmt: skip
    own = _run_root(recorded.parent)
    same = own is not None and own.resolve() == folder.root.resolve()
    rows = []
    for i in split.heldout:
        rel = folder.paths[i].relative_to(folder.root).as_posix()
        if rel in trained and (same or own is None or not (own / rel).is_file()
                               or _same_bytes(own / rel, folder.paths[i])):  # fmt: skip
            rows.append(i)
    return np.asarray(rows, dtype=np.int64)


def without_rows(data: RunData, rows: np.ndarray) -> RunData:
    """`data` with `rows` moved from the held-out side to the training side (images a model
    trained on belong there), so that no held-out figure or calibration scores them."""
    split = data.split
    kept = np.setdiff1d(split.heldout, rows)
    if len(kept) == 0:
        raise DataError(f"every held-out image of data.root {data.folder.root} trained this "
                        "model, so there is nothing to evaluate; evaluate on other images")
    moved = replace(split, train=np.union1d(split.train, rows), heldout=kept)
    turns = data.class_augment
    return RunData(data.folder, moved, _train_classes(data.folder, moved, turns), turns)


def _run_root(run_dir: Path) -> Path | None:
    """The folder the run in `run_dir` read its images from (its config.yaml's data.root),
    if it can still be read without extracting anything."""
    try:
        root = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["root"]
        return readable_root(str(root))
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return True  # unreadable now: judged by its path, as a run folder that moved


def record_data(data: RunData, run_dir: Path) -> None:
    """Write what `prepare_data(cfg, run_dir)` would have recorded, for data prepared before
    the run folder existed: the split and the notes."""
    save_split(run_dir / "split.json", data.split, data.folder)
    if data.folder.notes:
        (run_dir / "notes.txt").write_text("".join(f"{n}\n" for n in data.folder.notes))


def report_notes(notes: list[str], run_dir: Path | None) -> None:
    """Say each adaptation or skip once on stderr, and keep them in the run's notes.txt (once:
    a resumed run meets the same notes again)."""
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if notes and run_dir is not None:
        path = run_dir / "notes.txt"
        kept = set(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else set()
        new = [n for n in dict.fromkeys(notes) if n not in kept]
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in new))


class CachedFeatures(Dataset):
    """Prefix features computed once; yields what an `ImageDataset` yields."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.feats, self.labels, self.indices = feats, labels, indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.feats[i], int(self.labels[i]), int(self.indices[i])


def decode_size(dcfg: dict) -> int:
    """Smallest side JPEGs may be decoded at: the eval resize before its centre crop."""
    return math.ceil(min(dcfg["input_size"][1:]) / dcfg.get("crop_pct", 1.0))


def train_dataset(cfg: Config, data: RunData, dcfg: dict) -> ImageDataset:
    transform = train_transform(dcfg, cfg.data.augment)
    return ImageDataset(data.paths(data.train_rows), data.train_labels, transform,
                        decode_size(dcfg), turns=data.train_turns)  # fmt: skip


def train_loader(cfg: Config, data: RunData, dataset: Dataset, seed: int):
    """Balanced or shuffled batches of training images (or of their cached features).

    Built afresh each epoch with an epoch-derived `seed`: order and augmentations then depend
    only on (seed, epoch), which makes a resumed run repeat an uninterrupted one.
    """
    from mltrain.data.samplers import build_sampler  # training only (see mltrain.data)

    labels, batch = data.train_labels, cfg.train.batch_size
    sampler = build_sampler(cfg.train.sampler, labels, batch, seed=seed, groups=data.train_groups)
    if distributed.world()[1] > 1:  # this rank's slice of every global batch
        m = cfg.train.sampler.get("args", {}).get("m", 4) if sampler is not None else None
        local = distributed.local_batch_size(batch, m)
        sampler = distributed.RankSliceSampler(sampler, len(labels), batch, seed)
        batch = local
    workers = 0 if isinstance(dataset, CachedFeatures) else cfg.data.num_workers
    return make_loader(
        dataset,
        batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        seed=seed,
    )




def inference_workers(cfg: Config, images: int) -> int | None:
    """Loader workers for an inference pass. When the workers run the model (CPU, one thread
    each), one per usable core, up to 16; otherwise `data.num_workers` (None: the default)."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    on_cpu = resolve_device(cfg.train.device).type == "cpu"
    if cfg.eval.model_in_workers and on_cpu and workers_can_run_model():
        return min(usable_cpus(), 16) if worth_workers(images, cfg.eval.batch_size) else 0
    return None


def inference_loader(cfg: Config, dataset: Dataset, seed: int = 0) -> DataLoader:
    """Ordered batches of `dataset` for an inference pass with deterministic transforms (the
    worker count may follow the core count; augmented passes must not: `Loaders._cache_view`)."""
    workers = inference_workers(cfg, len(dataset))
    return make_loader(dataset, cfg.eval.batch_size, num_workers=workers, seed=seed)


def eval_loader(cfg: Config, paths: list[Path], labels: np.ndarray, dcfg: dict, transform=None):
    """Deterministic, ordered batches for embedding extraction."""
    dataset = ImageDataset(paths, labels, transform or eval_transform(dcfg), decode_size(dcfg))
    return inference_loader(cfg, dataset)
