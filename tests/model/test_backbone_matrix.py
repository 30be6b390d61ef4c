"""Every family on every shipped config: small random-weight members of each timm family train
through the shipped configs (trainable_stages, the prefix cache, BNNeck, proxies), and the
trained model evaluates, exports with an ONNX parity check and answers a search.

Kept fast: 32-64 px images, one step, the command flow on one config per family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from mltrain.config import ModelConfig, load_config
from mltrain.model.network import EmbeddingModel, build_model
from mltrain.model.pooling import POOLINGS
from tests.conftest import TINY_RUN, write_image_folder

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# (timm name, image size): one small member per family; 64 px where a patch-16 ViT needs
# more than a 2x2 grid to have patches to pool beside its class token
FAMILIES = {
    "resnet": ("test_resnet", 32),
    "convnext": ("test_convnext", 32),
    "efficientnet": ("test_efficientnet", 32),
    "mobilenetv3": ("mobilenetv3_small_050", 32),
    "regnet": ("regnetx_002", 32),
    "vit": ("test_vit", 64),
}
# command flow (evaluate, export --onnx, search) on one config per family: BatchNorm CNNs,
# a LayerNorm CNN, a token trunk under a BNNeck (EfficientNet's flow is tests/test_commands.py)
FLOW = {"resnet": "triplet", "convnext": "pooling", "mobilenetv3": "classification",
        "vit": "siamese"}  # fmt: skip
QUICK_EVAL = ["eval.tsne=false", "eval.rerank=false", "eval.index_types=[flat]",
              "eval.pca_lengths=[8]", "eval.one_shot_episodes=10"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("matrix") / "data", classes=3, per_class=6)


def _tiny_vit(**kwargs) -> torch.nn.Module:
    """A 2-block ViT at 32 px (timm's test_vit has no register tokens or distillation)."""
    name = kwargs.pop("name", "vit_tiny_patch16_224")
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=32, depth=2,
                             embed_dim=32, num_heads=2, **kwargs)  # fmt: skip


TRANSFORMERS = {
    "dinov2_registers": lambda: _tiny_vit(reg_tokens=4, no_embed_class=True),
    "deit_distilled": lambda: _tiny_vit(name="deit_tiny_distilled_patch16_224"),
    "swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=4,
    ),  # fmt: skip
}


def _check_split(model: EmbeddingModel, size: int) -> None:
    """The frozen prefix then the rest equals the whole; only the rest gets gradients."""
    assert 0 < model.frozen_stages < len(model._stages)
    x = torch.randn(3, 3, size, size)
    model.eval()
    with torch.no_grad():
        whole = model.embed(x)
        split = model.embed(model.prefix(x), from_prefix=True)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-4)
    model.train()
    model.logits(model(x)).sum().backward()
    frozen = [p for s in model._stages[: model.frozen_stages] for p in s.parameters()]
    trained = [p for s in model._stages[model.frozen_stages :] for p in s.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_stages_split_every_cnn_and_vit(family):
    name, size = FAMILIES[family]
    cfg = ModelConfig(backbone=name, pretrained=False, image_size=size, trainable_stages=1,
                      head=True, bnneck=True)  # fmt: skip
    model = build_model(cfg, num_classes=3)
    assert model.bnneck.num_features == model.trunk.num_features  # the real feature width
    _check_split(model, size)


@pytest.mark.parametrize("family", TRANSFORMERS)
@pytest.mark.parametrize("pooling", ["avg", "gem", "mean_tokens", "cls"])
def test_transformer_families_split_and_pool_their_tokens(family, pooling):
    trunk = TRANSFORMERS[family]()
    trunk.reset_classifier(0, global_pool="")
    if family == "swin" and pooling in ("cls", "mean_tokens"):
        with pytest.raises(Exception, match="model.pooling"):
            EmbeddingModel(trunk, POOLINGS.build({"name": pooling}), pooling_name=pooling)
        return
    model = EmbeddingModel(trunk, POOLINGS.build({"name": pooling}), num_classes=3,
                           bnneck=True, trainable_stages=1, pooling_name=pooling)  # fmt: skip
    _check_split(model, 32)


def test_token_poolings_skip_the_prefix_tokens():
    """Register and class tokens are not image patches: avg/gem/mean_tokens ignore them."""
    trunk = _tiny_vit(reg_tokens=4, no_embed_class=True)
    trunk.reset_classifier(0, global_pool="")
    assert trunk.num_prefix_tokens == 5
    tokens = torch.randn(2, 5 + 4, 32).abs() + 0.1
    changed = tokens.clone()
    changed[:, :5] = 100.0  # only the prefix tokens move
    for name in ("avg", "gem", "mean_tokens", "max"):
        model = EmbeddingModel(trunk, POOLINGS.build({"name": name}), pooling_name=name)
        torch.testing.assert_close(model.pool(changed), model.pool(tokens))
    cls = EmbeddingModel(trunk, POOLINGS.build({"name": "cls"}), pooling_name="cls")
    torch.testing.assert_close(cls.pool(tokens), tokens[:, 0])


def test_lite0_trains_exactly_what_frozen_stages_6_trained():
    """The shipped configs moved from frozen_stages: 6 to trainable_stages: 1 without
    changing what trains on EfficientNet-Lite0."""
    old = build_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained=False,
                                  frozen_stages=6))  # fmt: skip
    new = build_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained=False,
                                  trainable_stages=1))  # fmt: skip
    assert new.frozen_stages == 6
    trains = [[n for n, p in m.named_parameters() if p.requires_grad] for m in (old, new)]
    assert trains[0] == trains[1] and "trunk.blocks.5.0.conv_pw.weight" in trains[1]
    assert "trunk.blocks.4.0.conv_pw.weight" not in trains[1]


def test_a_family_with_no_split_trains_whole_with_a_note(capsys):
    """A trunk timm's metadata cannot split (no feature_info) is not an error for the
    shipped configs: the whole trunk trains and the run says so once."""
    flat = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    flat.num_features = 4
    model = EmbeddingModel(flat, POOLINGS.build({"name": "avg"}), trainable_stages=1)
    assert model.frozen_stages == 0
    assert "no stage split is known for Sequential" in capsys.readouterr().err


def _train(config: Path, name: str, size: int, data: Path, out: Path) -> Path:
    from mltrain.train import run as trainer

    cfg = load_config(config, [*TINY_RUN, f"model.backbone={name}", f"model.image_size={size}",
                               f"data.root={data}", f"output_dir={out}", "train.max_steps=1",
                               "train.epochs=1", "train.cache_views=1", "eval.batch_size=32",
                               "train.eval_start=false", "train.figures_every=0",
                               "data.split=per_class", "data.split_by=class"])  # fmt: skip
    return trainer.fit(cfg)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_every_shipped_config(family, config, data, tmp_path, capsys):
    name, size = FAMILIES[family]
    run_dir = _train(config, name, size, data, tmp_path / "exp")
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["steps"] == 1
    if FLOW.get(family) != config.stem:
        return
    from mltrain.commands import evaluate as evaluate_cmd
    from mltrain.commands import export as export_cmd
    from mltrain.commands import search as search_cmd

    quick = [arg for item in QUICK_EVAL for arg in ("--set", item)]
    evaluate_cmd.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "eval"), *quick])
    assert (tmp_path / "eval" / "report.md").is_file()
    bundle = tmp_path / "bundle"
    export_cmd.main(["--checkpoint", str(run_dir), "--out", str(bundle), "--onnx"])
    assert (bundle / "model.onnx").is_file()  # written only after its parity check passed
    query = sorted((data / "class_1").iterdir())[0]
    capsys.readouterr()
    for backend in ("torch", "onnx"):
        assert search_cmd.main([str(bundle), str(query), "--json", "--backend", backend]) == 0
        top = json.loads(capsys.readouterr().out)["queries"][0]["results"][0]
        assert top["path"] == f"class_1/{query.name}"  # the image finds itself first


@pytest.mark.parametrize(
    "sets, needle",
    [
        (
            ["model.frozen_stages=6"],
            "set it or model.frozen_stages, not both",
        ),
        (["model.trainable_stages=0"], "model.trainable_stages: must be at least 1"),
        (["model.trainable_stages=null"], "train.cache_frozen needs a frozen prefix"),
    ],
)
def test_freezing_settings_are_one_line_errors(sets, needle):
    from mltrain.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config(REPO / "configs" / "triplet.yaml", sets)


def test_class_token_pooling_on_a_cnn_names_the_fix():
    from mltrain.errors import ConfigError

    cfg = ModelConfig(backbone="test_resnet", pretrained=False, pooling={"name": "cls"})
    with pytest.raises(ConfigError, match="model.pooling: cls needs token outputs .* ResNet gives "
                       "feature maps; use avg or gem"):  # fmt: skip
        build_model(cfg)


def test_frozen_stages_past_the_end_points_to_trainable_stages():
    from mltrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.frozen_stages: 6 >= 5 stages of ResNet; use "
                       r"model.trainable_stages \(1 to 5"):  # fmt: skip
        build_model(ModelConfig(backbone="test_resnet", pretrained=False, frozen_stages=6))
