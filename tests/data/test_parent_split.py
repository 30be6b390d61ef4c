"""Class-disjoint splits by parent folder (`data.split_by: parent`): whole parents (the
alphabets of `alphabet/character/`) on each side, near the asked fractions, recorded in
split.json, and one-line errors where the data has no parents or too few."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mltrain.config import load_config
from mltrain.data.pipeline import prepare_data
from mltrain.data.samplers import build_sampler
from mltrain.data.splits import load_split, make_split, parent_of
from mltrain.errors import ConfigError, DataError
from tests.conftest import TINY_EMBED, write_image_folder

# 6 parents of 2 to 6 classes (24 classes): uneven, as Omniglot's alphabets are
SIZES = {"Greek": 4, "Latin": 6, "Korean": 2, "Tagalog": 3, "Sanskrit": 5, "Balinese": 4}


def nested_names() -> list[str]:
    return [f"{p}/char{c:02d}" for p, n in SIZES.items() for c in range(n)]


def parents_on(split_side: np.ndarray, labels: np.ndarray, parents: list[str]) -> set[str]:
    return {parents[int(c)] for c in np.unique(labels[split_side])}


@pytest.mark.parametrize("seed", range(8))
def test_no_parent_is_on_two_sides_and_the_test_share_is_near_the_asked_one(seed):
    names = sorted(nested_names())
    parents = [parent_of(n) for n in names]
    labels = np.repeat(np.arange(len(names)), 3)
    split = make_split(labels, "class_disjoint", 0.7, seed, val_fraction=0.2, parents=parents)
    sides = [parents_on(s, labels, parents) for s in (split.train, split.val, split.heldout)]
    assert all(sides) and sum(len(s) for s in sides) == len(SIZES)  # each parent on one side
    assert set().union(*sides) == set(SIZES)
    assert split.split_by == "parent" and len(split.train) + len(split.val) + len(
        split.heldout) == len(labels)  # fmt: skip
    n_test = len(np.unique(labels[split.heldout]))
    assert abs(n_test - 0.3 * len(names)) <= max(SIZES.values()) / 2  # closest whole parents
    again = make_split(labels, "class_disjoint", 0.7, seed, val_fraction=0.2, parents=parents)
    np.testing.assert_array_equal(again.train, split.train)  # deterministic with the seed
    two_way = make_split(labels, "class_disjoint", 0.7, seed, parents=parents)
    np.testing.assert_array_equal(two_way.heldout, split.heldout)  # val_fraction moves no test


def test_split_json_records_the_parents_and_evaluate_sees_the_same_test_side(tmp_path, capsys):
    root = write_image_folder(tmp_path / "omni", classes=nested_names(), per_class=2,
                              size=(16, 16))  # fmt: skip
    sets = [*TINY_EMBED, f"data.root={root}", "data.split=class_disjoint", "data.split_by=parent",
            "data.train_fraction=0.75", "data.val_fraction=0.15"]  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = prepare_data(load_config(None, sets), run_dir)
    doc = json.loads((run_dir / "split.json").read_text())
    assert doc["split_by"] == "parent"
    sides = {side: {parent_of(c) for _, c in doc[side]} for side in ("train", "val", "heldout")}
    assert {k: sorted(v) for k, v in sides.items()} == {k: sorted(v) for k, v in
                                                          doc["parents"].items()}  # fmt: skip
    assert not (sides["train"] & sides["val"] or sides["train"] & sides["heldout"]
                or sides["val"] & sides["heldout"])  # fmt: skip
    test = ", ".join(doc["parents"]["heldout"])
    note = f"data.split_by parent: whole parent folders on each side: test {test} ("
    assert note in capsys.readouterr().err and note in (run_dir / "notes.txt").read_text()
    assert load_split(run_dir / "split.json", data.folder).split_by == "parent"
    again = prepare_data(load_config(None, sets))  # as evaluate.py rebuilds it from the config
    np.testing.assert_array_equal(again.split.heldout, data.split.heldout)
    by_class = prepare_data(load_config(None, [*sets[:-3], "data.train_fraction=0.75"]))
    assert by_class.split.split_by == "class"


def test_training_batches_can_be_drawn_from_one_alphabet(tmp_path):
    root = write_image_folder(tmp_path / "omni", classes=nested_names(), per_class=2,
                              size=(16, 16))  # fmt: skip
    sets = [*TINY_EMBED, f"data.root={root}", "data.split=class_disjoint", "data.split_by=parent",
            "data.train_fraction=0.75", "data.val_fraction=0"]  # fmt: skip
    data = prepare_data(load_config(None, sets))
    groups, names = data.train_groups, sorted({parent_of(c) for c in data.train_classes})
    parents = [parent_of(data.train_classes[c]) for c in data.train_labels]
    assert [names[g] for g in groups] == parents and len(names) >= 2
    spec = {"name": "m_per_class", "args": {"m": 2, "parents": 1}}
    order = list(build_sampler(spec, data.train_labels, 4, seed=0, groups=groups))
    assert len(order) == len(data.train_labels) // 4 * 4
    for start in range(0, len(order), 4):  # every parent here has 2 or more classes
        assert len({parents[i] for i in order[start:start + 4]}) == 1


def test_data_without_parents_or_with_too_few_is_one_line(tmp_path):
    labels = np.repeat(np.arange(6), 2)
    with pytest.raises(DataError, match=r"^data.split_by parent: 2 of 6 classes have no parent "
                       r"folder .*or set data.split_by=class$"):  # fmt: skip
        make_split(labels, "class_disjoint", 0.5, 0, parents=["a", "a", "", "b", "b", ""])
    with pytest.raises(DataError, match=r"^data.split_by parent: 2 parent folders \(a, b\) "
                       "cannot make training and test sides"):  # fmt: skip
        make_split(labels, "class_disjoint", 0.5, 0, parents=["a"] * 5 + ["b"])
    two = ["a"] * 4 + ["b"] * 4  # one parent tests; the other cannot also validate
    with pytest.raises(DataError, match=r"the 1 parent folder left beside the test side \([ab]\) "
                       "cannot make validation and training sides"):  # fmt: skip
        make_split(np.arange(8), "class_disjoint", 0.5, 0, val_fraction=0.25, parents=two)
    auto = make_split(np.repeat(np.arange(40), 2), "class_disjoint", 0.5, 0, "auto",
                      parents=[f"p{c // 20}" for c in range(40)])  # fmt: skip
    assert len(auto.val) == 0  # two parents: auto gives up validation, as with few classes
    flat = write_image_folder(tmp_path / "flat", classes=6, per_class=2, size=(16, 16))
    with pytest.raises(DataError, match="6 of 6 classes have no parent folder"):
        prepare_data(load_config(None, [*TINY_EMBED, f"data.root={flat}",
                                        "data.split=class_disjoint", "data.split_by=parent"]))
    with pytest.raises(ConfigError, match="data.split_by parent: whole parent folders go to one "
                       "side only with data.split=class_disjoint \\(now per_class\\)"):  # fmt: skip
        load_config(None, ["data.split_by=parent"])
    with pytest.raises(ConfigError, match="data.split_by: 'alphabet' is not one of class, parent"):
        load_config(None, ["data.split=class_disjoint", "data.split_by=alphabet"])
