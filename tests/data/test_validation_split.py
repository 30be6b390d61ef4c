"""Three-way class_disjoint splits: validation classes come out of the training side, the
test classes stay those of the two-way split, and split.json records all three."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mltrain.config import load_config
from mltrain.data.pipeline import prepare_data
from mltrain.data.splits import make_split, val_classes
from mltrain.errors import ConfigError, DataError
from tests.conftest import TINY_EMBED, write_image_folder


def classes_of(labels: np.ndarray, idx: np.ndarray) -> set[int]:
    return {int(c) for c in labels[idx]}


def test_validation_classes_come_from_the_training_side_and_test_classes_do_not_move():
    labels = np.repeat(np.arange(40), 3)
    two = make_split(labels, "class_disjoint", 0.75, seed=0)  # 30 train, 10 test classes
    three = make_split(labels, "class_disjoint", 0.75, seed=0, val_fraction=0.2)
    assert len(two.val) == 0 and two.val_fraction == 0.0
    np.testing.assert_array_equal(three.heldout, two.heldout)  # the same test images
    # 0.2 of all 40 classes validate (8), taken out of the 30 non-test ones: 22 train
    assert len(classes_of(labels, three.val)) == 8 and three.val_fraction == 0.2
    assert len(classes_of(labels, three.train)) == 22
    assert classes_of(labels, three.train) | classes_of(labels, three.val) == classes_of(
        labels, two.train
    )
    assert not classes_of(labels, three.train) & classes_of(labels, three.val)
    np.testing.assert_array_equal(three.selection, three.val)
    np.testing.assert_array_equal(two.selection, two.heldout)  # no validation: the held-out


def test_auto_validates_on_15_percent_of_the_classes_when_that_makes_three():
    # 40 classes: round(0.15 * 40) = 6; 20 classes: 3; 10 classes: round(1.5) = 2 < 3: none
    assert val_classes("auto", 40, 30) == 6
    assert val_classes("auto", 20, 10) == 3
    assert val_classes("auto", 10, 8) == 0
    assert val_classes("auto", 20, 4) == 0  # 3 would leave 1 class to train on
    assert val_classes(0.0, 40, 30) == 0
    assert val_classes(0.01, 40, 30) == 2  # at least 2: retrieval needs 2 classes
    with pytest.raises(DataError, match="data.val_fraction 0.5 of 8 classes asks for 4"):
        val_classes(0.5, 8, 5)
    labels = np.repeat(np.arange(20), 2)
    auto = make_split(labels, "class_disjoint", 0.5, seed=3, val_fraction="auto")
    assert len(classes_of(labels, auto.val)) == 3 and auto.val_fraction == 0.15
    per_class = make_split(labels, "per_class", 0.5, seed=3, val_fraction="auto")
    assert len(per_class.val) == 0


def test_val_fraction_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="data.val_fraction 0.2: validation classes need "
                       "data.split=class_disjoint"):  # fmt: skip
        load_config(None, ["data.val_fraction=0.2"])
    with pytest.raises(ConfigError, match="data.val_fraction: expected auto or a number"):
        load_config(None, ["data.val_fraction=some"])
    with pytest.raises(ConfigError, match=r"data.val_fraction: must be in \[0, 1\)"):
        load_config(None, ["data.split=class_disjoint", "data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="must be below data.train_fraction 0.5"):
        load_config(None, ["data.split=class_disjoint", "data.val_fraction=0.5"])
    cfg = load_config(None, ["data.split=class_disjoint", "data.val_fraction=0"])
    assert cfg.data.val_fraction == 0.0 and load_config(None).data.val_fraction == "auto"


def test_split_json_records_three_sides_and_a_note_says_who_chooses(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", classes=8, per_class=3)
    cfg = load_config(None, [*TINY_EMBED, f"data.root={root}", "data.split=class_disjoint",
                             "data.train_fraction=0.75", "data.val_fraction=0.25"])  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = prepare_data(cfg, run_dir)
    doc = json.loads((run_dir / "split.json").read_text())
    assert [len({c for _, c in doc[s]}) for s in ("train", "val", "heldout")] == [4, 2, 2]
    assert len(doc["val"]) == len(data.split.val) == 6
    note = ("data.val_fraction 0.25: 4 training classes (12 images); 2 validation classes "
            "(6 images) choose best.pt; 2 test classes (6 images) are only evaluated")
    assert note in capsys.readouterr().err
    assert note in (run_dir / "notes.txt").read_text()
    # an untrained backbone evaluated with val_fraction 0 meets the same test images
    plain = prepare_data(load_config(None, [*TINY_EMBED, f"data.root={root}",
                         "data.split=class_disjoint", "data.train_fraction=0.75",
                         "data.val_fraction=0"]))  # fmt: skip
    np.testing.assert_array_equal(plain.split.heldout, data.split.heldout)


def test_a_run_split_two_way_resumes_two_way(tmp_path):
    """A run whose split.json has no validation side started before validation classes
    existed: resuming keeps its two-way split instead of refusing a changed one."""
    root = write_image_folder(tmp_path / "data", classes=20, per_class=2)
    sets = [*TINY_EMBED, f"data.root={root}", "data.split=class_disjoint"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = prepare_data(load_config(None, [*sets, "data.val_fraction=0"]), run_dir)
    doc = json.loads((run_dir / "split.json").read_text())
    del doc["val"], doc["val_fraction"]
    (run_dir / "split.json").write_text(json.dumps(doc))
    cfg = load_config(None, sets)  # auto would validate on 3 of the 20 classes
    again = prepare_data(cfg, run_dir, resuming=True)
    assert len(again.split.val) == 0 and cfg.data.val_fraction == 0.0
    np.testing.assert_array_equal(again.split.train, old.split.train)
