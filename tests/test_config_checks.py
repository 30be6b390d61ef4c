"""Config checks beyond the types: choices, numeric ranges, non-finite numbers, the loader
workers this machine can run, run names. Each bad value is one line naming its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mltrain.config import from_dict, load_config
from mltrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# --- choices and ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.split=random", "data.split"),
        ("data.bad_images=ignore", "data.bad_images"),
        ("train.amp=fp8", "train.amp"),
        ("train.device=tpu", "train.device"),
        ("eval.metric=dot", "eval.metric"),
        ("eval.gallery=test", "eval.gallery"),
        ("eval.amp=fp8", "eval.amp"),
        ("model.crop_mode=zoom", "model.crop_mode"),
    ],
)
def test_choices_rejected_with_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"{key}:" in str(info.value) and "is not one of" in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.optimizer.args.lr=-1e-3", "train.optimizer.args.lr"),
        ("train.optimizer.args.lr=0", "train.optimizer.args.lr"),
        ("train.optimizer.args.lr=fast", "train.optimizer.args.lr"),
        ("data.train_fraction=1.5", "data.train_fraction"),
        ("data.train_fraction=0", "data.train_fraction"),
        ("eval.ks=[0]", "eval.ks"),
        ("eval.pca_lengths=[8, 0]", "eval.pca_lengths"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=-4", "train.batch_size"),
        ("model.embedding_dim=0", "model.embedding_dim"),
        ("model.frozen_stages=-1", "model.frozen_stages"),
        ("model.crop_pct=0", "model.crop_pct"),
        ("model.crop_pct=1.2", "model.crop_pct"),
        ("train.cache_frozen=true", "train.cache_frozen"),
        ("name=../../escape", "name: '../../escape' must be a single folder name"),
        ("name=..", "name: '..' must be a single folder name"),
        ("model.pooling={name: gem, args: {p: 0}}", "model.pooling.args.p: GeM's power"),
        ("model.pooling={name: gem, args: {p: abc}}", "model.pooling.args.p: GeM's power"),
    ],
)
def test_ranges_rejected_with_key(override, key):
    # triplet.yaml spells out the optimizer, so the lr override lands in a full component
    path = REPO / "configs" / "triplet.yaml"
    no_prefix = ["model.trainable_stages=null"]  # the shipped configs freeze a prefix
    overrides = [override] + (no_prefix if "cache_frozen" in override else [])
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert key in str(info.value)


def test_hints_for_a_number_given_as_text_and_one_item_given_as_a_list():
    path = REPO / "configs" / "triplet.yaml"
    with pytest.raises(ConfigError, match=r"name: expected str, got 2026; quote it \('2026'\)"):
        load_config(path, ["name=2026"])
    with pytest.raises(ConfigError, match=r"expected a list, got 'alpha0'; write one item as a "
                                          r"list: \[alpha0\]"):
        load_config(path, ["data.exclude_classes=alpha0"])
    assert load_config(path, ["name='2026'"]).name == "2026"  # the hint works


def test_train_fraction_unchecked_without_split():
    cfg = from_dict({"data": {"split": "none", "train_fraction": 1.5}})
    assert cfg.data.train_fraction == 1.5


def test_max_steps_one_is_fine():
    assert load_config(None, ["train.max_steps=1"]).train.max_steps == 1


# --- hostile values: ranges, non-finite numbers, machine limits, names ---------------------


@pytest.mark.parametrize(
    "override, says",
    [
        ("model.image_size=0", "model.image_size: must be between 16 and 4,096"),
        ("model.image_size=-5", "model.image_size: must be between 16 and 4,096"),
        ("model.image_size=100000", "model.image_size: must be between 16 and 4,096"),
        ("seed=-5", "seed: must be between 0 and 4,294,967,295"),
        ("seed=4294967296", "seed: must be between 0 and 4,294,967,295"),
        ("eval.tsne_max_points=-1", "eval.tsne_max_points: must be between 10 and 100,000"),
        ("eval.verification_pairs=-1", "eval.verification_pairs: must be between 0"),
        ("eval.one_shot_episodes=0", "eval.one_shot_episodes: must be between 1"),
        ("train.max_bad_steps=0", "train.max_bad_steps: must be at least 1"),
        ("train.batch_size=10000000", "train.batch_size: must be between 1 and 65,536"),
        ("export.k=0", "export.k: must be between 1 and 1,000"),
        ("export.pca_dim=0", "export.pca_dim: must be between 1"),
        ("train.figures_every=-1", "train.figures_every: must be at least 0 (0 = never)"),
    ],
)
def test_numeric_keys_have_ranges(override, says):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert says in message and f"got {override.split('=')[1]}" in message.replace(",", "")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.optimizer.args.lr=1e400", "train.optimizer.args.lr: inf is not a finite"),
        ("train.optimizer.args.lr=.nan", "train.optimizer.args.lr: nan is not a finite"),
        ("train.optimizer.args.betas=[0.9, .inf]", "train.optimizer.args.betas[1]: inf"),
        ("train.loss.args.margin=-1e999", "train.loss.args.margin: -inf is not a finite"),
        ("train.loss_lr=1e400", "train.loss_lr: inf is not a finite"),
        ("data.train_fraction=.nan", "data.train_fraction: nan is not a finite"),
        ("export.index_args={nprobe: .inf}", "export.index_args.nprobe: inf is not a finite"),
    ],
)
def test_non_finite_numbers_are_refused_anywhere_in_a_config(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_learning_rates_must_be_positive_and_finite():
    for lr in ("0", "-1e-3", "1e400"):
        with pytest.raises(ConfigError, match="train.optimizer.args.lr"):
            load_config(None, [f"train.optimizer.args.lr={lr}"])
    assert load_config(None, ["train.optimizer.args.lr=3e-4"]).train.optimizer["args"]["lr"] == 3e-4


def test_loader_workers_are_bounded_by_this_machine(monkeypatch):
    import mltrain.config_checks as config_mod

    monkeypatch.setattr(config_mod, "machine_cores", lambda: 2)
    monkeypatch.setattr(config_mod, "machine_memory", lambda: 64 * 2**30)
    assert config_mod.max_loader_workers() == 8  # at least 8; 4 per core
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.num_workers=100000"])
    assert str(info.value).endswith(
        "data.num_workers: 100,000 is not a worker count this machine runs; use 0 to 8 (2 "
        "cores, 4 workers a core, 256 MiB of memory each), or leave it out (null: min(cores, 4))"
    )
    with pytest.raises(ConfigError, match="use 0 to 8"):
        load_config(None, ["data.num_workers=-1"])
    assert load_config(None, ["data.num_workers=8"]).data.num_workers == 8
    monkeypatch.setattr(config_mod, "machine_cores", lambda: 64)
    assert config_mod.max_loader_workers() == 256
    monkeypatch.setattr(config_mod, "machine_memory", lambda: 2**30)  # 1 GiB: 4 workers fit
    assert config_mod.max_loader_workers() == 4


def test_too_many_workers_stop_the_train_command_before_anything_forks(monkeypatch, capsys):
    """The whole command, with forking made fatal: one line, exit 2."""
    import multiprocessing.context
    import os

    from mltrain.__main__ import main

    def no_fork(*args, **kwargs):
        raise AssertionError("a process was forked")

    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(multiprocessing.context.Process, "start", no_fork)
    with pytest.raises(SystemExit) as e:
        main(["train", "--set", "data.num_workers=100000"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.num_workers: 100,000" in err


@pytest.mark.parametrize("name, says", [
    ("x" * 1_000_000, "(1,000,000 characters) is too long for a folder name; use at most 128"),
    ("run\x1b[31m", "holds control or invisible characters"),
    ("a\u200bb", "holds control or invisible characters"),
])  # fmt: skip
def test_run_names_are_checked_and_echoed_short(name, says):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"name={name}"])
    assert says in str(info.value) and len(str(info.value)) < 400
