"""Which weights best.pt holds: never worse than the untrained start, the metric's direction
(EER lower, ROC AUC higher), and chosen on validation classes when the split has them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mltrain.config import load_config
from mltrain.data.splits import make_split
from mltrain.train import run as trainer
from tests.conftest import TINY_RUN, write_image_folder

TINY = [*TINY_RUN, "train.epochs=2", "eval.batch_size=16", "train.figures_every=0",
        "eval.rerank=false", "train.whiten=off"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def scripted_run(tmp_path, monkeypatch, key: str, values: list[float], *extra: str):
    """Train a tiny run whose held-out `key` reads `values` in turn: the start, then each
    epoch. Returns (run folder, metrics.json)."""
    figures = iter(values)

    def evaluate(self, figures_=False, **_):
        return {"precision_at_1": 0.5, "map_at_r": 0.5, key: next(figures)}

    monkeypatch.setattr(trainer.Run, "evaluate", evaluate)
    root = write_image_folder(tmp_path / "data", classes=4, per_class=6)
    cfg = load_config("configs/triplet.yaml", [*TINY, f"data.root={root}",
                      f"output_dir={tmp_path / 'exp'}", f"train.best_metric={key}",
                      f"train.epochs={len(values) - 1}", *extra])  # fmt: skip
    run_dir = trainer.fit(cfg)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def ckpt(run_dir, name):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def test_best_pt_keeps_the_untrained_weights_when_no_epoch_beats_them(
    tmp_path, monkeypatch, capsys
):
    run_dir, summary = scripted_run(tmp_path, monkeypatch, "map_at_r", [0.8, 0.6, 0.7])
    best, last = ckpt(run_dir, "best.pt"), ckpt(run_dir, "last.pt")
    assert best["state"]["step"] == 0 and best["state"]["epoch"] == 0
    assert best["best"]["epoch"] == 0 and best["best"]["map_at_r"] == 0.8
    # the weights are the model's before the first step, not the trained ones
    trained = [k for k, v in best["model"].items()
               if v.is_floating_point() and not torch.equal(v, last["model"][k])]  # fmt: skip
    assert trained
    assert summary["best_is_start"] is True and summary["best"]["epoch"] == 0
    notes = [n for n in summary["notes"] if "never beat the untrained" in n]
    assert len(notes) == 1 and "best.pt holds the untrained starting weights" in notes[0]
    assert capsys.readouterr().err.count("best.pt holds the untrained starting weights") == 1


def test_an_epoch_must_beat_the_start_not_tie_it_while_later_epochs_win_ties(
    tmp_path, monkeypatch
):
    run_dir, summary = scripted_run(tmp_path, monkeypatch, "map_at_r", [0.7, 0.7, 0.7])
    assert summary["best"]["epoch"] == 0 and summary["best_is_start"] is True
    run_dir, summary = scripted_run(tmp_path / "b", monkeypatch, "map_at_r", [0.6, 0.7, 0.7])
    assert summary["best"]["epoch"] == 2 and summary["best_is_start"] is False
    assert ckpt(run_dir, "best.pt")["state"]["epoch"] == 2
    assert not any("never beat" in n for n in summary.get("notes", []))


def test_improves_needs_a_strict_gain_over_the_start_and_a_tie_over_an_epoch():
    from mltrain.train.checkpoints import improves

    start = {"epoch": 0, "map_at_r": 0.7, "eer": 0.2}
    epoch = {"epoch": 1, "map_at_r": 0.7, "eer": 0.2}
    assert not improves("map_at_r", {"map_at_r": 0.7}, start)  # a tie keeps the start
    assert improves("map_at_r", {"map_at_r": 0.7}, epoch)  # a tie goes to the later epoch
    assert not improves("map_at_r", {"map_at_r": 0.69}, epoch)
    assert improves("eer", {"eer": 0.1}, start) and not improves("eer", {"eer": 0.3}, epoch)
    assert not improves("map_at_r", {}, epoch)  # an epoch not evaluated never replaces best.pt
    assert improves("map_at_r", {"map_at_r": 0.1}, {})  # the first evaluated epoch


def test_eer_selects_the_lowest_and_roc_auc_the_highest_start_included(tmp_path, monkeypatch):
    _, summary = scripted_run(tmp_path / "a", monkeypatch, "eer", [0.20, 0.30, 0.10, 0.15])
    assert summary["best"]["epoch"] == 2 and summary["best"]["eer"] == 0.10
    _, summary = scripted_run(tmp_path / "b", monkeypatch, "eer", [0.05, 0.30, 0.10])
    assert summary["best"]["epoch"] == 0 and summary["best_is_start"] is True
    _, summary = scripted_run(tmp_path / "c", monkeypatch, "roc_auc", [0.80, 0.70, 0.90, 0.85])
    assert summary["best"]["epoch"] == 2 and summary["best"]["roc_auc"] == 0.90
    _, summary = scripted_run(tmp_path / "d", monkeypatch, "roc_auc", [0.95, 0.70, 0.90])
    assert summary["best"]["epoch"] == 0


def test_without_eval_start_the_first_epoch_is_the_first_best(tmp_path, monkeypatch):
    run_dir, summary = scripted_run(tmp_path, monkeypatch, "map_at_r", [0.6, 0.5],
                                    "train.eval_start=false")  # fmt: skip
    # no start is measured: the single value read is epoch 1's
    assert summary["best"]["epoch"] == 1 and summary["best_is_start"] is False
    assert summary["start"] == {}


def test_shipped_siamese_selects_on_verification():
    assert load_config("configs/siamese.yaml").train.best_metric == "roc_auc"


def test_best_pt_is_chosen_on_validation_classes_and_the_test_classes_stay_unseen(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=8, per_class=4)
    sets = [*TINY, f"data.root={root}", f"output_dir={tmp_path / 'exp'}", "train.epochs=1",
            "data.split=class_disjoint", "data.train_fraction=0.75", "data.val_fraction=0.25",
            "train.cache_frozen=false"]  # fmt: skip
    cfg = load_config("configs/triplet.yaml", sets)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    run = trainer.Run(cfg, tmp_path / "run")
    # 8 classes: 6 not test (0.75), of which 2 validate (0.25 of 8) and 4 train; 2 test
    doc = json.loads((tmp_path / "run" / "split.json").read_text())
    sides = {s: sorted({c for _, c in doc[s]}) for s in ("train", "val", "heldout")}
    assert [len(sides[s]) for s in ("train", "val", "heldout")] == [4, 2, 2]
    assert doc["val_fraction"] == 0.25
    # the held-out figures that pick best.pt are the validation images: 2 classes x 4
    assert len(run.eval_batches.dataset) == 8
    assert sorted(run.eval_batches.dataset.paths) == sorted(root / p for p, _ in doc["val"])
    # the test classes are those of the two-way split with the same settings
    labels = np.repeat(np.arange(8), 4)
    two_way = make_split(labels, "class_disjoint", 0.75, cfg.seed, 0.0)
    names = [f"class_{i}" for i in range(8)]
    assert sides["heldout"] == sorted({names[i] for i in labels[two_way.heldout]})
    not_test = sorted({names[i] for i in labels[two_way.train]})
    assert sorted(sides["train"] + sides["val"]) == not_test
    run.writer.close()
