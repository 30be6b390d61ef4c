"""Typed configs: strict YAML, `--set` overrides, validation, round trips."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from mltrain.config import (
    Config,
    DataConfig,
    from_dict,
    load_config,
    parse_override,
    save_config,
    validate,
)
from mltrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> tuple[str, Path]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value), path


# --- defaults and shipped files -------------------------------------------------------------


def test_defaults_are_valid():
    cfg = Config()
    assert validate(cfg) is cfg
    assert load_config() == cfg
    assert cfg.train.optimizer == {"name": "adamw", "args": {"lr": 1e-4, "weight_decay": 1e-4}}


def test_shipped_configs_exist():
    assert {p.stem for p in SHIPPED} >= {"classification", "pooling", "siamese", "triplet"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name == path.stem
    assert validate(cfg) is cfg
    # numbers written as 1.0e-4 stay numbers, not strings
    lr = cfg.train.optimizer["args"]["lr"]
    assert isinstance(lr, float) and 0 < lr < 1
    # every component is normalised to {name, args}
    for comp in (cfg.train.loss, cfg.train.sampler, cfg.train.optimizer, cfg.model.pooling):
        assert set(comp) == {"name", "args"} and isinstance(comp["args"], dict)


# --- strict keys and types ------------------------------------------------------------------


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    msg, path = config_error(tmp_path, "epochs: 3\n")
    assert "'epochs'" in msg
    assert str(path) in msg
    assert "valid keys here" in msg and "train" in msg


def test_unknown_nested_key_names_dotted_key_and_file(tmp_path):
    msg, path = config_error(tmp_path, "train:\n  epoch: 3\n")
    assert "'train.epoch'" in msg
    assert str(path) in msg
    assert "epochs" in msg  # lists the valid keys of that section


def test_unknown_key_in_deeper_section(tmp_path):
    msg, _ = config_error(tmp_path, "model:\n  backbone: resnet18\n  embeding_dim: 64\n")
    assert "'model.embeding_dim'" in msg


def test_wrong_type_string_for_int_names_key(tmp_path):
    msg, path = config_error(tmp_path, "train:\n  epochs: ten\n")
    assert "train.epochs" in msg and "'ten'" in msg and str(path) in msg


def test_wrong_type_int_for_bool_names_key(tmp_path):
    msg, _ = config_error(tmp_path, "model:\n  head: 1\n")
    assert "model.head" in msg and "true or false" in msg


def test_bool_is_not_an_int(tmp_path):
    msg, _ = config_error(tmp_path, "train:\n  epochs: true\n")
    assert "train.epochs" in msg


def test_section_must_be_a_mapping(tmp_path):
    msg, _ = config_error(tmp_path, "train: 5\n")
    assert "train" in msg and "mapping" in msg


def test_list_item_type_names_index(tmp_path):
    msg, _ = config_error(tmp_path, "eval:\n  ks: [1, five]\n")
    assert "eval.ks[1]" in msg


def test_ints_accepted_for_floats(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  grad_clip: 2\ndata:\n  train_fraction: 0.25\n"))
    assert cfg.train.grad_clip == 2.0 and isinstance(cfg.train.grad_clip, float)
    cfg = from_dict({"data": {"split": "none", "train_fraction": 1}})
    assert isinstance(cfg.data.train_fraction, float)


def test_pretrained_accepts_bool_or_string_but_not_int():
    assert from_dict({"model": {"pretrained": False}}).model.pretrained is False
    assert from_dict({"model": {"pretrained": "w.pt"}}).model.pretrained == "w.pt"
    with pytest.raises(ConfigError, match="model.pretrained"):
        from_dict({"model": {"pretrained": 1}})


def test_missing_file_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; see configs/ for examples"):
        load_config(tmp_path / "nope.yaml")
    for typed in ("triplet", "triplet.yaml", "configs/triplet"):  # run from the repository
        with pytest.raises(ConfigError) as info:
            load_config(typed)
        assert str(info.value) == (
            f"config file {typed} does not exist; did you mean configs/triplet.yaml?"
        )
    msg, _ = config_error(tmp_path, "train: [unclosed\n")
    assert "not valid YAML" in msg
    msg, _ = config_error(tmp_path, "- a\n- b\n")
    assert "mapping" in msg


def test_empty_file_gives_defaults_with_stem_name(tmp_path):
    cfg = load_config(write(tmp_path, "", name="empty.yaml"))
    assert cfg == dataclasses.replace(Config(), name="empty")


# --- --set overrides --------------------------------------------------------------------------


def test_parse_override_values():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("a.b.c=1e-3") == (["a", "b", "c"], 0.001)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=false") == (["x"], False)
    assert parse_override("x=null") == (["x"], None)
    assert parse_override("x=") == (["x"], None)
    assert parse_override("x=a=b") == (["x"], "a=b")  # split on the first '=' only


def test_override_top_level_and_nested():
    cfg = load_config(None, ["seed=7", "train.epochs=3", "model.backbone=resnet18"])
    assert (cfg.seed, cfg.train.epochs, cfg.model.backbone) == (7, 3, "resnet18")
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep defaults


def test_override_component_arg_in_file_merges_into_args():
    cfg = load_config(REPO / "configs" / "triplet.yaml", ["train.optimizer.args.lr=1e-3"])
    assert cfg.train.optimizer == {"name": "adamw", "args": {"lr": 0.001, "weight_decay": 1e-4}}
    assert isinstance(cfg.train.optimizer["args"]["lr"], float)


def test_override_numbers_lists_bools_null():
    cfg = load_config(
        None,
        [
            "train.grad_clip=1e-3",
            "eval.ks=[1, 3]",
            "model.normalize=false",
            "model.embedding_dim=64",
            "model.embedding_dim=null",  # later overrides win
            "data.exclude_classes=[]",
        ],
    )
    assert cfg.train.grad_clip == pytest.approx(0.001)
    assert cfg.eval.ks == [1, 3]
    assert cfg.model.normalize is False
    assert cfg.model.embedding_dim is None
    assert cfg.data.exclude_classes == []


def test_override_component_shorthand():
    cfg = load_config(None, ["train.loss=TripletMarginLoss"])
    assert cfg.train.loss == {"name": "TripletMarginLoss", "args": {}}


def test_override_without_equals_is_error():
    with pytest.raises(ConfigError, match=r"--set 'nokey': expected key=value"):
        load_config(None, ["nokey"])


def test_override_unknown_key_names_key_and_override():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["nokey=1"])
    assert "'nokey'" in str(info.value) and "--set nokey=1" in str(info.value)
    with pytest.raises(ConfigError, match=r"'train\.nokey'"):
        load_config(None, ["train.nokey=1"])


def test_an_error_names_only_the_override_that_wrote_its_key():
    sets = ["seed=3", "train.epochs=2", "train.batchsize=8", "data={split: none}"]
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    assert str(info.value).startswith("defaults with --set train.batchsize=8: unknown key")
    with pytest.raises(ConfigError, match=r"^defaults with --set data=\{split: bogus\}: data\."):
        load_config(None, ["seed=3", "data={split: bogus}"])  # a mapping names its leaves
    with pytest.raises(ConfigError, match=r"^defaults with --set trian\.epochs=2: unknown key"):
        load_config(None, ["seed=3", "trian.epochs=2"])  # 'seed' is among the valid keys listed
    with pytest.raises(ConfigError, match=r"^defaults with --set model\.pooling\.argz\.size=2: "):
        load_config(None, ["name=x", "model.pooling.argz.size=2"])  # the message says "name"
    # a key no override wrote (the file's own value): every override is named
    with pytest.raises(ConfigError, match=r"^f\.yaml with --set seed=3 train\.epochs=2: train\."):
        from_dict({"train": {"batch_size": 0}}, "f.yaml", ["seed=3", "train.epochs=2"])


def test_several_unknown_keys_are_named_at_once_with_their_closest_valid_key():
    sets = ["data.train_fracton=0.75", "train.epoch=1", "model.imagesize=64", "seed=2"]
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    assert str(info.value) == (
        "defaults with --set data.train_fracton=0.75 train.epoch=1 model.imagesize=64: unknown "
        "keys 'data.train_fracton' (did you mean 'train_fraction'?), 'model.imagesize' (did you "
        "mean 'image_size'?), 'train.epoch' (did you mean 'epochs'?)")  # seed=2 is fine
    with pytest.raises(ConfigError, match=r"unknown keys 'bogus', 'train\.zzz'$"):
        from_dict({"bogus": 1, "train": {"zzz": 2}})  # nothing close: no guess


def test_override_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.epochs.*'ten'"):
        load_config(None, ["train.epochs=ten"])


def test_override_through_a_scalar_is_error(tmp_path):
    path = write(tmp_path, "name: foo\n")
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(path, ["name.sub=1"])


def test_override_component_arg_on_defaults():
    cfg = load_config(None, ["train.optimizer.args.lr=1e-3"])
    assert cfg.train.optimizer == {"name": "adamw", "args": {"lr": 0.001, "weight_decay": 1e-4}}


def test_quoted_numeric_string_stays_string(tmp_path):
    cfg = load_config(write(tmp_path, 'name: "1e3"\n'))
    assert cfg.name == "1e3"


# --- components -------------------------------------------------------------------------------


def test_component_shorthand_in_file(tmp_path):
    text = "train:\n  loss: TripletMarginLoss\n  miner: BatchHardMiner\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.train.loss == {"name": "TripletMarginLoss", "args": {}}
    assert cfg.train.miner == {"name": "BatchHardMiner", "args": {}}


def test_component_null_args_become_empty(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  pooling: {name: gem, args: null}\n"))
    assert cfg.model.pooling == {"name": "gem", "args": {}}


def test_component_list_shorthand(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  augment: [HorizontalFlip, {name: Blur}]\n"))
    assert cfg.data.augment == [
        {"name": "HorizontalFlip", "args": {}},
        {"name": "Blur", "args": {}},
    ]


def test_component_extra_keys_rejected(tmp_path):
    msg, path = config_error(tmp_path, "train:\n  loss: {name: TripletMarginLoss, margin: 0.1}\n")
    assert "train.loss" in msg and "'margin'" in msg and str(path) in msg


def test_component_without_name_or_bad_args_rejected(tmp_path):
    msg, _ = config_error(tmp_path, "train:\n  loss: {args: {margin: 0.1}}\n")
    assert "train.loss" in msg
    msg, _ = config_error(tmp_path, "train:\n  loss: {name: TripletMarginLoss, args: [1]}\n")
    assert "train.loss.args" in msg
    msg, _ = config_error(tmp_path, "model:\n  pooling: 3\n")
    assert "model.pooling" in msg


# --- names and round trips --------------------------------------------------------------------


def test_name_defaults_to_file_stem(tmp_path):
    assert load_config(write(tmp_path, "seed: 1\n", name="my_run.yaml")).name == "my_run"
    assert load_config(write(tmp_path, "name: other\n", name="x.yaml")).name == "other"
    assert load_config(None).name == "run"


def test_override_name_beats_file_stem(tmp_path):
    assert load_config(write(tmp_path, "seed: 1\n", name="a.yaml"), ["name=b"]).name == "b"


def test_save_then_load_round_trip(tmp_path):
    cfg = load_config(
        REPO / "configs" / "pooling.yaml",
        [
            "train.optimizer.args.lr=1e-5",
            "train.grad_clip=0.5",
            "model.pretrained=false",
            "eval.ks=[1, 2]",
            "model.embedding_dim=32",
        ],
    )
    out = tmp_path / "saved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.name == "pooling"  # the saved name, not the file stem "saved"
    assert yaml.safe_load(out.read_text())["model"]["pretrained"] is False


def test_round_trip_of_defaults(tmp_path):
    out = tmp_path / "d.yaml"
    save_config(Config(), out)
    assert load_config(out) == Config()
    assert isinstance(load_config(out).data, DataConfig)


def test_a_key_written_twice_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 1\n  batch_size: 8\n  epochs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    first = str(info.value).splitlines()[0]
    assert first == f"{path}: not valid YAML: key 'epochs' appears twice in one section"
    assert 'line 4, column 3' in str(info.value)


def test_a_broken_inline_mapping_in_set_says_it_is_not_yaml():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.loss={name: TripletMarginLoss, args: {margin: 0.1}"])
    assert str(info.value) == (
        "--set train.loss: '{name: TripletMarginLoss, args: {margin: 0.1}' is not valid YAML "
        "(expected ',' or '}', but got '<stream end>'); check its brackets and quotes"
    )
    from mltrain.config import parse_override

    assert parse_override("name=a: b: c") == (["name"], "a: b: c")  # not YAML: kept as text


def test_a_list_as_a_key_is_one_line_and_a_k_with_a_leading_zero_is_refused(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("train:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="'precision_at_05' is not a held-out metric"):
        load_config(None, ["train.best_metric=precision_at_05"])  # never a metric's key


def test_inference_commands_refuse_only_what_training_alone_reads():
    from mltrain.config import check_inference_overrides

    check_inference_overrides(["train.device=cpu", "train.channels_last=false", "eval.amp=off",
                               "data.root=/x", "model.crop_pct=1.0", "seed=1",
                               "train={device: cpu}", "data={root: /x}"], "evaluate")
    for item, key in [("data={augment: []}", "data.augment"),  # a whole section slips no key
                      ("model={bn_stats: update, crop_pct: 1.0}", "model.bn_stats"),
                      ("train.loss={name: TripletMarginLoss}", "train.loss")]:  # as written
        with pytest.raises(ConfigError, match=rf"^--set {re.escape(key)}: only training"):
            check_inference_overrides([item], "evaluate")
    for key, end in [("train", "it takes effect in train.py"),
                     ("train.optimizer.args.lr", "it takes effect in train.py"),
                     ("data.augment", "it takes effect in train.py"),
                     ("model.bn_stats", "it takes effect in train.py"),
                     ("model.frozen_stages", "it takes effect in train.py"),
                     ("train.batch_size", "set eval.batch_size instead")]:
        with pytest.raises(ConfigError) as info:
            check_inference_overrides([f"{key}=1"], "export")
        assert str(info.value) == (
            f"--set {key}: only training reads it, so export would ignore it; {end}"
        )


@pytest.mark.parametrize("module", ["mltrain.commands.train", "mltrain.commands.evaluate",
                                    "mltrain.commands.export", "mltrain.commands.compare"])
def test_a_config_or_override_without_its_flag_is_told_the_flag(module):
    """`train.py configs/triplet.yaml` got argparse's bare "unrecognized arguments"."""
    import importlib

    command = importlib.import_module(module).main
    out = ["--out", "b"] if module.endswith("export") else []  # its one required flag

    def main(argv):
        return command([*out, *argv])

    with pytest.raises(ConfigError) as info:
        main(["configs/triplet.yaml"])
    assert str(info.value) == ("unexpected argument configs/triplet.yaml: give a config as "
                               "--config configs/triplet.yaml")  # fmt: skip
    with pytest.raises(ConfigError) as info:
        main(["--config", "configs/triplet.yaml", "train.epochs=3"])
    assert str(info.value) == ("unexpected argument train.epochs=3: give an override as --set "
                               "train.epochs=3")  # fmt: skip
    with pytest.raises(SystemExit):  # anything else: argparse's own usage error
        main(["--bogus"])


# --- malformed files ------------------------------------------------------------------------


@pytest.mark.parametrize("content, says", [
    (b"[" * 20_000, "not valid YAML: nested too deeply"),
    (bytes(range(256)) * 16, "is not UTF-8 text (byte 128 is 0x80); pass a YAML config"),
    (b"# padding\n" * 200_000, "holds 2,000,000 bytes, more than a config (1 MiB at most)"),
])  # fmt: skip
def test_malformed_config_files_are_one_line_naming_the_file(tmp_path, content, says):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and says in str(info.value)
    assert "\n" not in str(info.value)


def test_a_deeply_nested_set_value_is_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.loss=" + "[" * 20_000])
    message = str(info.value)
    assert "nested too deeply" in message and "(20,000 characters)" in message
    assert len(message) < 400
