"""`model.pretrained` sources with no network: weight files of each format, the local Hugging
Face cache, hf-hub ids, and a one-line error naming the alternatives when the hub is out of
reach."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from mltrain.config import ModelConfig, load_config
from mltrain.errors import ConfigError, MltrainError
from mltrain.model.network import build_model, create_backbone


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_weight_files_of_each_format_load(suffix, tmp_path):
    source = timm.create_model("test_resnet", pretrained=False, num_classes=10)  # with its fc
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = create_backbone("test_resnet", str(path), num_classes=0)
    assert torch.equal(loaded.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(loaded.layer4[0].conv1.weight, source.layer4[0].conv1.weight)


def test_vit_file_at_another_image_size_is_resampled(tmp_path):
    """A ViT saved at its native size loads at model.image_size: timm's own checkpoint filter
    resamples the position embedding, as it does for hub weights."""
    source = timm.create_model("test_vit", pretrained=False, num_classes=0)  # 160 px
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = ModelConfig(backbone="test_vit", pretrained=str(path), image_size=64,
                      pooling={"name": "cls"})  # fmt: skip
    model = build_model(cfg)
    assert model.trunk.pos_embed.shape[1] == 1 + (64 // 16) ** 2
    assert torch.equal(model.trunk.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.embed(torch.randn(2, 3, 64, 64)).shape == (2, source.num_features)


def test_patch_size_constraint_is_one_line():
    with pytest.raises(ConfigError, match=r"model.image_size: 50 is not a multiple of "
                       r"test_vit's patch size 16; use 48 or 64"):  # fmt: skip
        create_backbone("test_vit", False, image_size=50)


def test_training_checks_the_patch_size_before_reading_data(tmp_path):
    from mltrain.train.optim import check_optimization

    cfg = load_config("configs/siamese.yaml", [
        "model.backbone=vit_tiny_patch16_224", "model.pretrained=false", "model.image_size=100",
        f"data.root={tmp_path / 'absent'}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"100 is not a multiple of .* use 96 or 112"):
        check_optimization(cfg)  # before the missing data root is ever looked at
    cfg.model.image_size = 112
    check_optimization(cfg)
    cfg.model.pooling = {"name": "grid", "args": {"size": 0}}
    with pytest.raises(ConfigError, match=r"size: 0 is not a grid side"):
        check_optimization(cfg)  # pooling args too, before the data
    cfg.model.pooling = {"name": "grid", "args": {"size": 8}}  # ViT-Ti/16 at 112 px: 7 x 7
    with pytest.raises(ConfigError, match=r"grid size 8 needs feature maps of 8 x 8 or more, "
                                          r"got 7 x 7"):  # fmt: skip
        check_optimization(cfg)
    cfg.model.pooling = {"name": "grid", "args": {"size": 7}}
    check_optimization(cfg)


def _fake_hf_cache(root: Path, repo: str, state: dict) -> None:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_pretrained_true_reads_the_local_hugging_face_cache(offline_hub):
    source = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    _fake_hf_cache(offline_hub, repo, source.state_dict())
    assert _same(create_backbone("test_resnet", True, num_classes=0), source)


def test_hf_hub_id_reads_the_local_cache(offline_hub):
    source = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    _fake_hf_cache(offline_hub, "someone/my-resnet", source.state_dict())
    assert _same(create_backbone("test_resnet", "hf-hub:someone/my-resnet"), source)


def test_unreachable_hub_is_one_line_naming_the_other_sources(offline_hub):
    with pytest.raises(MltrainError) as info:
        create_backbone("test_resnet", True)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("model.pretrained: could not fetch")
    assert "Hugging Face cache" in msg and ".safetensors" in msg and msg.endswith("or false")


def test_malformed_hub_id_is_refused_before_anything_loads():
    with pytest.raises(ConfigError, match="hf-hub:ORG/NAME"):
        create_backbone("test_resnet", "hf-hub:no-slash")
