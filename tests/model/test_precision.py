"""Large-kernel depthwise convolutions in fp32 under CPU bf16 autocast, only when trained."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from mltrain.model.precision import Fp32WhenTrained, depthwise_in_fp32, is_depthwise, slow_in_bf16


def block() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 1),  # pointwise
        nn.Conv2d(8, 8, 5, padding=2, groups=8),  # depthwise 5x5: switched
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # grouped, not depthwise
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise 3x3: fast in bf16, kept
    )


def bf16(fn, *args):
    with torch.autocast("cpu", torch.bfloat16):
        return fn(*args)


def test_only_depthwise_layers_are_switched_and_keys_stay():
    net = block()
    keys = list(net.state_dict())
    assert depthwise_in_fp32(net) == 1
    assert [is_depthwise(m) for m in net] == [False, True, False, True]
    assert [slow_in_bf16(m) for m in net] == [False, True, False, False]
    assert list(net.state_dict()) == keys


def test_trained_depthwise_runs_in_fp32_and_matches_fp32():
    net = block()
    ref = copy.deepcopy(net[1])
    depthwise_in_fp32(net)
    x = torch.randn(2, 8, 6, 6)
    out = bf16(net[1], x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref(x))  # the fp32 result, not a bf16 one
    assert bf16(ref, x).dtype == torch.bfloat16
    assert bf16(net[0], torch.randn(2, 4, 6, 6)).dtype == torch.bfloat16  # pointwise untouched
    assert bf16(net[3], x).dtype == torch.bfloat16  # 3x3 depthwise untouched


def test_forward_only_passes_keep_bf16():
    net = block()
    depthwise_in_fp32(net)
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        assert bf16(net[1], x).dtype == torch.bfloat16
    net[1].weight.requires_grad_(False)  # a frozen layer with no gradient flowing in
    assert bf16(net[1], x).dtype == torch.bfloat16
    assert bf16(net[1], x.requires_grad_()).dtype == torch.float32  # gradient flows through


def test_without_autocast_nothing_changes():
    net = block()
    ref = copy.deepcopy(net)
    depthwise_in_fp32(net)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


def test_a_copy_uses_its_own_weights():
    net = block()
    depthwise_in_fp32(net)
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin[1].weight.zero_()
        twin[1].bias.zero_()
    x = torch.randn(2, 8, 6, 6)
    assert bf16(twin[1], x).abs().max() == 0
    assert bf16(net[1], x).abs().max() > 0


def test_gradients_flow_to_every_layer_in_a_bf16_step():
    net = block()
    depthwise_in_fp32(net)
    loss = bf16(lambda x: net(x).float().square().mean(), torch.randn(2, 4, 6, 6))
    loss.backward()
    for p in net.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_a_patched_model_pickles_and_keeps_the_switch():
    net = block()
    depthwise_in_fp32(net)
    back = pickle.loads(pickle.dumps(net))
    x = torch.randn(2, 8, 6, 6)
    assert bf16(back[1], x).dtype == torch.float32
    torch.testing.assert_close(bf16(back[1], x), bf16(net[1], x))


def test_fp16_autocast_is_left_alone():
    net = block()
    depthwise_in_fp32(net)
    with torch.autocast("cpu", torch.float16):
        assert net[1](torch.randn(2, 8, 6, 6)).dtype == torch.float16


@pytest.mark.parametrize("switch", [True, False])
def test_the_trainer_applies_train_depthwise_fp32(tmp_path, monkeypatch, switch):
    from mltrain.config import load_config
    from mltrain.train import run as trainer
    from tests.conftest import TINY_RUN, write_image_folder

    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    cfg = load_config(
        "configs/classification.yaml",
        [
            *TINY_RUN,
            f"data.root={root}",
            f"output_dir={tmp_path / 'exp'}",
            "train.cache_frozen=false",
            "model.trainable_stages=null",
            f"train.depthwise_fp32={str(switch).lower()}",
        ],
    )
    run = trainer.Run(cfg, tmp_path / "run")
    switched = [
        m for m in run.model.modules() if isinstance(m.__dict__.get("forward"), Fp32WhenTrained)
    ]
    assert len(switched) == (sum(slow_in_bf16(m) for m in run.model.modules()) if switch else 0)
    assert not switch or switched  # tf_efficientnet_lite0 has 5x5 depthwise layers
