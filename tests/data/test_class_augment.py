"""Class augmentation (`data.class_augment`): each turned copy of a training class is a class of
its own, on the training side only, and the config refuses names it does not know, repeats, and
augmentations that would turn a class into its own copy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mltrain.config import load_config
from mltrain.data.class_augment import turn
from mltrain.data.dataset import ImageDataset
from mltrain.data.pipeline import prepare_data
from mltrain.data.splits import parent_of
from mltrain.errors import ConfigError
from mltrain.model.checkpoint import load_checkpoint
from mltrain.train import run as trainer
from tests.conftest import TINY_EMBED, TINY_RUN, write_image_folder

NESTED = [f"{p}/char{c}" for p, n in {"Greek": 3, "Latin": 4, "Korean": 3}.items()
          for c in range(n)]  # fmt: skip


def test_turns_by_hand():
    a = np.arange(6).reshape(2, 3, 1)  # [[0 1 2], [3 4 5]]
    assert turn(a, "rotate90")[..., 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert turn(a, "rotate180")[..., 0].tolist() == [[5, 4, 3], [2, 1, 0]]
    assert turn(a, "rotate270")[..., 0].tolist() == [[3, 0], [4, 1], [5, 2]]
    assert turn(a, "mirror")[..., 0].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert turn(a, "") is a
    assert turn(a, "rotate90").flags["C_CONTIGUOUS"]  # torch.from_numpy needs no copy


def test_each_turn_makes_a_copy_of_every_training_class(tmp_path):
    root = write_image_folder(tmp_path / "omni", classes=NESTED, per_class=2, size=(16, 16))
    sets = [*TINY_EMBED, f"data.root={root}", "data.split=class_disjoint", "data.split_by=parent",
            "data.train_fraction=0.7", "data.val_fraction=0"]  # fmt: skip
    plain = prepare_data(load_config(None, sets))
    data = prepare_data(load_config(None, [*sets, "data.class_augment=[rotate90, mirror]"]))
    for side in ("train", "val", "heldout"):  # the split itself is the same
        np.testing.assert_array_equal(getattr(data.split, side), getattr(plain.split, side))
    n, images = len(plain.train_classes), len(plain.split.train)
    assert data.train_classes == [*plain.train_classes,
                                  *[f"{c} (rotate90)" for c in plain.train_classes],
                                  *[f"{c} (mirror)" for c in plain.train_classes]]  # fmt: skip
    np.testing.assert_array_equal(data.train_rows, np.tile(plain.split.train, 3))
    assert data.train_turns == [""] * images + ["rotate90"] * images + ["mirror"] * images
    labels = plain.train_labels
    np.testing.assert_array_equal(data.train_labels, np.concatenate([labels, labels + n,
                                                                     labels + 2 * n]))  # fmt: skip
    # a turned character stays in its alphabet, for batches drawn by parent
    names = sorted({parent_of(c) for c in data.train_classes})
    assert [names[g] for g in data.train_groups] == [
        parent_of(data.train_classes[c]) for c in data.train_labels]  # fmt: skip


def test_a_class_named_like_a_turned_copy_keeps_its_own_label(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=["a", "a (mirror)", "b"], per_class=2)
    data = prepare_data(load_config(None, [*TINY_EMBED, f"data.root={root}", "data.split=none",
                                           "data.class_augment=[mirror]"]))  # fmt: skip
    assert data.train_classes == ["a", "a (mirror)", "b", "a (mirror)", "a (mirror) (mirror)",
                                  "b (mirror)"]  # fmt: skip
    assert data.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_inference_commands_refuse_it():
    from mltrain.config import check_inference_overrides

    with pytest.raises(ConfigError, match=r"^--set data.class_augment: only training reads it"):
        check_inference_overrides(["data.class_augment=[mirror]"], "evaluate")


def test_the_dataset_turns_an_item_before_its_transform(tmp_path):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # 3 wide, 2 high
    Image.fromarray(pixels).save(tmp_path / "a.png")
    as_is = lambda a: torch.from_numpy(a.copy())  # noqa: E731
    ds = ImageDataset([tmp_path / "a.png"] * 3, [0, 1, 2], as_is, turns=["", "rotate90", "mirror"])
    assert ds[0][0].numpy().tolist() == pixels.tolist()
    assert ds[1][0].numpy().tolist() == np.rot90(pixels).tolist()  # now 2 wide, 3 high
    assert ds[2][0].numpy().tolist() == pixels[:, ::-1].tolist()
    assert ImageDataset([tmp_path / "a.png"], [0], as_is, turns=[""]).turns is None
    with pytest.raises(ValueError, match="1 paths but 1 labels and 2 turns"):
        ImageDataset([tmp_path / "a.png"], [0], as_is, turns=["", "mirror"])


@pytest.mark.parametrize(("sets", "needle"), [
    (["data.class_augment=[rotate45]"],
     "data.class_augment: 'rotate45' is not one of rotate90, rotate180, rotate270, mirror"),
    (["data.class_augment=[mirror, rotate90, mirror]"],
     "data.class_augment: mirror listed more than once; list each turn once"),
    (["data.class_augment=[mirror]", "data.augment=[{name: HorizontalFlip}]"],
     "data.class_augment mirror: data.augment's HorizontalFlip turns images the same way"),
    (["data.class_augment=[rotate270]", "data.augment=[{name: RandomRotate90}]"],
     "data.class_augment rotate270: data.augment's RandomRotate90 turns images the same way"),
    (["data.class_augment=[rotate90, mirror]", "data.augment=[{name: Transpose}]"],
     "data.class_augment mirror: data.augment's Transpose turns images the same way"),
    (["data.class_augment=[mirror]", "eval.flip_tta=true"],
     "eval.flip_tta embeds each image as the mean of it and its mirror, while"),
])  # fmt: skip
def test_bad_class_augment_is_a_one_line_config_error(sets, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.usefixtures("one_thread_private_cache")
def test_a_run_trains_the_turned_classes_from_cached_views(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=4, per_class=4, size=(24, 32))
    cfg = load_config("configs/handwriting.yaml", [
        *TINY_RUN, "train.epochs=1", "eval.batch_size=16", "data.split_by=class",
        "data.train_fraction=0.5", "data.val_fraction=0", "train.cache_views=1",
        "train.whiten=off", "data.class_augment=[rotate90, rotate180]",
        f"data.root={root}", f"output_dir={tmp_path / 'exp'}"])  # fmt: skip
    run_dir = trainer.fit(cfg)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert len(ckpt["train_classes"]) == 3 * 2 and ckpt["train_classes"][2].endswith(" (rotate90)")
    head = [v for k, v in ckpt["model"].items() if k.endswith("weight") and v.shape[0] == 6]
    assert head, "the classifier has a row per class, turned copies included"
    assert ckpt["config"]["data"]["class_augment"] == ["rotate90", "rotate180"]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] >= 1
    assert ("data.class_augment rotate90, rotate180: the 2 training classes and their turned "
            "copies train as 6 classes (24 images an epoch)") in (run_dir / "notes.txt").read_text()


def test_counts_in_words_take_the_plural_their_noun_takes():
    from mltrain.text import counted

    assert [counted(1, "training class"), counted(2, "training class"), counted(2, "epoch"),
            counted(3, "batch"), counted(1, "image"), counted(0, "image")] == [
        "1 training class", "2 training classes", "2 epochs", "3 batches", "1 image",
        "0 images"]  # fmt: skip
