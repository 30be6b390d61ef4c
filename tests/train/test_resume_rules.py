"""What a resumed run may change, and checks that run before any training step: the data must
be the images the run started with, and train.best_metric must be computable."""

from __future__ import annotations

from pathlib import Path

import pytest

from mltrain.config import Config, load_config
from mltrain.data.pipeline import prepare_data
from mltrain.errors import ConfigError, DataError
from mltrain.train.checkpoints import check_best_metric_fits, check_resume_overrides
from mltrain.train.run import fit
from tests.conftest import TINY_RUN, write_image_folder

REPO = Path(__file__).resolve().parents[2]


def _cfg(root: Path) -> Config:
    cfg = Config()
    cfg.data.root = str(root)
    cfg.data.exclude_classes = []
    return cfg


def test_resume_overrides_allow_data_location_device_and_evaluation_only():
    check_resume_overrides(["data.root=/elsewhere", "data.num_workers=0", "train.device=cpu",
                            "eval.tsne=false", "eval.ks=[1, 3]"])  # fmt: skip
    with pytest.raises(ConfigError) as info:
        check_resume_overrides(["eval.tsne=false", "train.optimizer.args.lr=5e-4"])
    assert str(info.value) == (
        "--set train.optimizer.args.lr: --resume continues the run exactly, so only data.root, "
        "data.num_workers, train.device, eval.* (not eval.metric, eval.flip_tta) may change; "
        "start a new run to change it"
    )
    with pytest.raises(ConfigError, match="--set eval.metric: --resume continues"):
        check_resume_overrides(["eval.metric=l2"])  # the best checkpoint's scale
    with pytest.raises(ConfigError, match="--set train.epochs: --resume continues"):
        check_resume_overrides(["train.epochs=3"])
    with pytest.raises(ConfigError, match="--set evaluation: --resume"):  # a prefix, not eval.
        check_resume_overrides(["evaluation=1"])


def test_a_resumed_run_refuses_data_that_changed_since_it_started(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    run = tmp_path / "run"
    before = prepare_data(_cfg(root), run)
    assert prepare_data(_cfg(root), run, resuming=True).split.train.tolist() == (
        before.split.train.tolist()
    )
    gone = sorted((root / "class_0").iterdir())[:2]
    for path in gone:
        path.unlink()
    first = sorted((root / "class_1").iterdir())[0]
    (root / "class_1" / f"extra{first.suffix}").write_bytes(first.read_bytes())
    with pytest.raises(DataError) as info:
        prepare_data(_cfg(root), run, resuming=True)
    message = str(info.value)
    assert message == (f"--resume: the images under {root} changed since the run started "
                       f"(2 gone or relabelled, 1 new, against {run / 'split.json'}); restore "
                       "them, or start a new run")  # fmt: skip
    # the recorded split is left as it was, for when the images come back
    assert (run / "split.json").read_text().count("class_0/") == 6


def test_a_run_without_split_json_resumes_unchecked(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=4)
    run = tmp_path / "run"
    run.mkdir()
    data = prepare_data(_cfg(root), run, resuming=True)
    assert len(data.split.train) + len(data.split.heldout) == 12
    assert not (run / "split.json").exists()


def test_best_metric_k_must_be_one_of_eval_ks():
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/triplet.yaml", ["train.best_metric=precision_at_7"])
    assert str(info.value).endswith(
        "train.best_metric: precision_at_7 needs 7 in eval.ks (now [1, 5, 10]); add it, "
        "e.g. --set 'eval.ks=[1, 5, 7, 10]'"
    )
    load_config(REPO / "configs/triplet.yaml", ["train.best_metric=recall_at_5"])


def test_best_metric_k_must_fit_the_heldout_split():
    cfg = Config()
    cfg.train.best_metric = "precision_at_5"
    check_best_metric_fits(cfg, 6)
    with pytest.raises(ConfigError) as info:
        check_best_metric_fits(cfg, 5)
    assert str(info.value) == (
        "train.best_metric: precision_at_5 needs 6 or more held-out images; this split holds "
        "5: choose a k of at most 4, or map_at_r"
    )
    cfg.train.best_metric = "precision_at_1"
    check_best_metric_fits(cfg, 1)  # k=1 is always computed


def test_fit_stops_before_training_when_best_metric_cannot_be_computed(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=2, per_class=4)
    cfg = load_config(REPO / "configs/triplet.yaml",
                      [*TINY_RUN, f"data.root={root}", f"output_dir={tmp_path / 'exp'}",
                       "train.best_metric=precision_at_5"])  # fmt: skip
    with pytest.raises(ConfigError, match="this split holds 4: choose a k of at most 3"):
        fit(cfg)
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").rglob("*.pt"))


def test_a_random_sampler_argument_is_refused_before_the_prefix_cache(tmp_path, monkeypatch):
    from mltrain.train.loaders import Loaders

    root = write_image_folder(tmp_path / "data", classes=3, per_class=4)
    cfg = load_config(REPO / "configs/classification.yaml",
                      [*TINY_RUN, f"data.root={root}", f"output_dir={tmp_path / 'exp'}",
                       "train.sampler={name: random, args: {m: 4}}"])  # fmt: skip
    monkeypatch.setattr(Loaders, "_cache_view", lambda *a: pytest.fail("prefix cached"))
    with pytest.raises(ConfigError, match=r"^sampler 'random': bad args \['m'\]"):
        fit(cfg)


def test_notes_already_in_notes_txt_are_not_written_again(tmp_path, capsys):
    from mltrain.data.pipeline import report_notes

    report_notes(["batch shrunk to 8", "class x skipped"], tmp_path)
    report_notes(["class x skipped", "a new note", "a new note"], tmp_path)  # e.g. a resume
    assert (tmp_path / "notes.txt").read_text().splitlines() == [
        "batch shrunk to 8", "class x skipped", "a new note"]  # fmt: skip
    assert capsys.readouterr().err.count("note: class x skipped") == 2  # still said each time


def test_a_freeze_longer_than_the_run_is_noted(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=4)
    cfg = load_config(REPO / "configs/classification.yaml",
                      [*TINY_RUN, f"data.root={root}", f"output_dir={tmp_path / 'exp'}",
                       "train.epochs=1", "train.freeze_backbone_epochs=2", "eval.tsne=false",
                       "model.trainable_stages=null", "train.cache_frozen=false"])  # fmt: skip
    run_dir = fit(cfg)
    assert ("train.freeze_backbone_epochs 2 >= train.epochs 1: the trunk stays frozen for the "
            "whole run; only what follows it trains") in (run_dir / "notes.txt").read_text()


def test_a_split_rule_that_changed_is_told_apart_from_changed_images(tmp_path):
    import json

    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    run = tmp_path / "run"
    prepare_data(_cfg(root), run)
    doc = json.loads((run / "split.json").read_text())
    doc["train"], doc["heldout"] = doc["heldout"], doc["train"]  # as another rule would side them
    (run / "split.json").write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        prepare_data(_cfg(root), run, resuming=True)
    assert str(info.value) == (
        "--resume: the images are those the run started with, but this version of mltrain "
        f"splits them differently from {run / 'split.json'}; resume with the version that "
        "started the run, or start a new run"
    )
    cfg = _cfg(root)
    cfg.data.split = "none"  # train and held-out are the same images: nothing to misplace
    none_run = tmp_path / "none_run"
    prepare_data(cfg, none_run)
    prepare_data(cfg, none_run, resuming=True)


def test_a_run_started_before_the_stricter_checks_still_resumes(tmp_path):
    """A run saved with a loss_lr its loss ignored, or a random sampler given arguments, was
    accepted when it started; resuming it must not fail on the checks added since."""
    from mltrain.files import atomic_save
    from mltrain.model.checkpoint import load_checkpoint

    root = write_image_folder(tmp_path / "data", classes=3, per_class=4)
    cfg = load_config(REPO / "configs/classification.yaml",
                      [*TINY_RUN, f"data.root={root}", f"output_dir={tmp_path / 'exp'}",
                       "train.epochs=1", "eval.tsne=false",
                       "train.sampler={name: random}"])  # fmt: skip
    run_dir = fit(cfg)
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["config"]["train"]["loss_lr"] = 0.1  # cross-entropy owns no parameters
    ckpt["config"]["train"]["sampler"] = {"name": "random", "args": {"m": 4}}
    atomic_save(ckpt, last)
    assert fit(resume=run_dir) == run_dir
