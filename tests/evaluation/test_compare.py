"""The backbone comparison: one row per backbone on the same held-out images."""

from __future__ import annotations

import pytest

from mltrain.commands.compare import main
from mltrain.evaluation.compare import compare, markdown
from tests.foreign_data import write_drawings


def test_compare_backbones_on_the_same_images(tmp_path, capsys):
    root = write_drawings(tmp_path / "d", alphabets=2, chars=3, per_class=6, size=32)
    sets = [f"data.root={root}", "model.pretrained=false", "model.image_size=32",
            "data.num_workers=0", f"output_dir={tmp_path / 'exp'}"]  # fmt: skip
    rows = compare("configs/pooling.yaml", ["tf_efficientnet_lite0", "resnet18"], sets)
    assert [r["backbone"] for r in rows] == ["tf_efficientnet_lite0", "resnet18"]
    assert [r["embedding_dim"] for r in rows] == [1280, 512]
    assert all(r["images"] == 18 and 0 <= r["precision_at_1"] <= 1 for r in rows)
    assert rows[1]["parameters"] > rows[0]["parameters"] > 3_000_000
    table = markdown(rows).splitlines()
    assert table[0].startswith("| backbone | precision@1 | MAP@R | book score")
    assert table[3].startswith("| resnet18 | ") and "| 512 |" in table[3]
    main(["--config", "configs/pooling.yaml", "--backbones", "resnet18",
          *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "c")])  # fmt: skip
    assert (tmp_path / "c" / "compare.md").read_text().count("\n") == 3
    assert "written to" in capsys.readouterr().out


def test_a_backbone_set_in_overrides_is_refused_for_backbones():
    from mltrain.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        main(["--set", "model.backbone=tf_efficientnet_lite1"])
    assert str(info.value) == (
        "--set model.backbone=tf_efficientnet_lite1: compare sets model.backbone itself; name "
        "the networks with --backbones NAME [NAME ...]"
    )


@pytest.mark.parametrize("command", ["evaluate", "export", "compare"])
def test_a_training_key_in_set_is_refused_before_any_work(command, tmp_path):
    """`evaluate --set train.epochs=3` used to run and ignore it; the data root does not exist,
    so the refusal comes before anything is read."""
    import importlib

    from mltrain.errors import ConfigError

    main_ = importlib.import_module(f"mltrain.commands.{command}").main
    source = [] if command == "compare" else ["--backbone", "tf_efficientnet_lite0"]
    extra = ["--out", str(tmp_path / "o")] if command == "export" else []
    base = [*source, "--config", "configs/pooling.yaml", *extra,
            "--set", f"data.root={tmp_path / 'missing'}"]  # fmt: skip
    with pytest.raises(ConfigError) as info:
        main_([*base, "--set", "train.epochs=3"])
    assert str(info.value) == (f"--set train.epochs: only training reads it, so {command} "
                               "would ignore it; it takes effect in train.py")  # fmt: skip
    with pytest.raises(ConfigError) as info:
        main_([*base, "--set", "train.amp=off"])
    assert str(info.value).endswith("ignore it; set eval.amp instead")


def test_evaluate_a_backbone_of_another_family_under_a_config_with_frozen_stages(tmp_path):
    """configs/pooling.yaml freezes 6 stages; resnet18 has 5. Untrained, nothing is frozen, so
    `evaluate --backbone resnet18` no longer stops at 'model.frozen_stages: 6 >= 5 stages'."""
    from mltrain.commands.evaluate import main as evaluate

    root = write_drawings(tmp_path / "d", alphabets=2, chars=2, per_class=4, size=32)
    evaluate(["--backbone", "resnet18", "--config", "configs/pooling.yaml",
              "--out", str(tmp_path / "e"),
              *[a for s in [f"data.root={root}", "model.pretrained=false", "model.image_size=32",
                            "data.num_workers=0", "eval.tsne=false", "eval.pca_lengths=[]",
                            "eval.index_types=[flat]", "eval.rerank=false"]
                for a in ("--set", s)]])  # fmt: skip
    assert (tmp_path / "e" / "metrics.json").is_file()


def test_compare_across_families_times_training_and_names_the_weights(tmp_path):
    """A ViT and a CNN side by side under a config whose weights are offline-only: both are
    compared with random weights (said so), each with its token/feature width and a training
    speed measured through the config's trainable stages."""
    root = write_drawings(tmp_path / "d", alphabets=2, chars=3, per_class=6, size=32)
    sets = [f"data.root={root}", "model.image_size=64", "data.num_workers=0",
            f"output_dir={tmp_path / 'exp'}"]  # fmt: skip
    rows = compare("configs/triplet.yaml", ["test_vit", "test_resnet"], sets, train_steps=1)
    assert [r["embedding_dim"] for r in rows] == [64, 96]
    assert [r["weights"] for r in rows] == ["random", "random"]
    assert all(r["train_images_per_s"] > 0 for r in rows)
    assert markdown(rows).splitlines()[2].endswith(" | random |")
