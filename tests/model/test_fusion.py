"""BatchNorm folding for inference: same embeddings, no BatchNorm left, original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mltrain.config import ModelConfig
from mltrain.model.fusion import fold_batchnorm
from mltrain.model.network import EmbeddingModel, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise_bn(model: nn.Module) -> None:
    """Pretrained-like statistics, so that folding is not the identity."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "resnet18"])
def test_folded_model_embeds_the_same(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, pretrained=False)).eval()
    _randomise_bn(model)
    keys = set(model.state_dict())
    x = torch.randn(3, 3, 64, 64)
    fast = fold_batchnorm(model, x[:2])
    assert fast is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.trunk.modules())
    with torch.inference_mode():
        torch.testing.assert_close(fast.embed(x), model.embed(x), atol=1e-5, rtol=1e-4)
    assert set(model.state_dict()) == keys  # the trained model (for export) is unchanged
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.trunk.modules())


class OrderLiar(nn.Module):
    """Registers conv then BatchNorm, but does not apply them in sequence."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward_features(self, x):
        y = self.conv(x)
        return y + self.bn(y)


def test_folding_that_changes_outputs_is_discarded_with_a_warning():
    model = EmbeddingModel(OrderLiar(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
    _randomise_bn(model)
    with pytest.warns(UserWarning, match="BatchNorm folding changed"):
        assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) is model


def test_model_without_batchnorm_is_returned_as_is():
    trunk = nn.Module()
    trunk.conv = nn.Conv2d(3, 4, 3)
    trunk.num_features = 4
    trunk.forward_features = trunk.conv
    model = EmbeddingModel(trunk, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) is model


def test_embedder_folds_by_default_and_matches_unfolded(tmp_path):
    from mltrain.config import load_config
    from mltrain.inference.embedder import make_embedder
    from tests.conftest import TINY_RUN, write_image_folder

    root = write_image_folder(tmp_path / "data", classes=2, per_class=3)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    sets = [*TINY_RUN, f"data.root={root}", "eval.amp=off"]
    cfg = load_config(None, sets)
    model = build_model(cfg.model).eval()
    _randomise_bn(model)
    folded = make_embedder(cfg, model)
    plain = make_embedder(load_config(None, [*sets, "eval.fold_bn=false"]), model)
    assert folded.forward_model is not model and plain.forward_model is model
    torch.testing.assert_close(folded.embed(paths), plain.embed(paths), atol=1e-5, rtol=1e-4)


def test_the_fold_check_compares_in_plain_fp32_and_restores_the_tf32_switches(monkeypatch):
    """cuDNN runs fp32 convolutions in TF32 by default; on an H200 that moved the probe's
    embeddings by 1.7e-3 and every fold was rejected. The switches are plain fp32 only for
    the check, and come back as they were."""
    from mltrain.model.fusion import _tf32_switches

    switches = _tf32_switches()
    seen = []
    real_embed = EmbeddingModel.embed

    def embed(self, x):
        seen.append([getattr(owner, name) for owner, name, _ in switches])
        return real_embed(self, x)

    monkeypatch.setattr(EmbeddingModel, "embed", embed)
    before = [getattr(owner, name) for owner, name, _ in switches]
    model = build_model(ModelConfig(backbone="resnet18", pretrained=False)).eval()
    _randomise_bn(model)
    assert fold_batchnorm(model, torch.randn(2, 3, 32, 32)) is not model
    plain = [value for _, _, value in switches]
    assert seen == [plain, plain]  # the original's and the folded copy's embeddings
    assert [getattr(owner, name) for owner, name, _ in switches] == before
    if hasattr(torch.backends.cudnn, "conv"):  # torch 2.9+: convolutions default to TF32
        assert plain == ["ieee", "ieee"]
