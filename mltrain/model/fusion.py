"""BatchNorm folded into the convolution before it, for inference.

An eval-mode BatchNorm is a per-channel affine map, so a conv followed by one equals a single
conv with rescaled weights and a bias. Folding saves one pass over every activation map, which
on CPU is a large share of an EfficientNet's time. Pairs are found by registration order (conv,
then its BatchNorm), which is how timm's blocks are written; the folded copy is checked against
the original on a probe batch and discarded if they disagree, so an architecture that breaks the
convention only loses the speed-up.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mltrain.model.network import EmbeddingModel


def _after_bn(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of a BatchNorm once its affine part is folded: timm's BatchNormAct2d also
    applies dropout and an activation."""
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*parts) if parts else nn.Identity()


def _fold_children(parent: nn.Module) -> int:
    names = list(parent._modules)
    folded = 0
    for a, b in zip(names, names[1:], strict=False):
        conv, bn = parent._modules[a], parent._modules[b]
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and bn.track_running_stats
            and conv.out_channels == bn.num_features
        ):
            parent._modules[a] = fuse_conv_bn_eval(conv, bn)
            parent._modules[b] = _after_bn(bn)
            folded += 1
    return folded


def _tf32_switches() -> list[tuple[object, str, object]]:
    """(owner, attribute, plain-fp32 value) of what lets fp32 convolutions and matmuls run in
    TF32: torch 2.9+'s per-operation `fp32_precision` where present (reading the older
    `allow_tf32` there raises once the two kinds of setting disagree), else `allow_tf32`."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [(conv, "fp32_precision", "ieee"),
                (torch.backends.cuda.matmul, "fp32_precision", "ieee")]  # fmt: skip
    return [(torch.backends.cudnn, "allow_tf32", False),
            (torch.backends.cuda.matmul, "allow_tf32", False)]  # fmt: skip


@contextlib.contextmanager
def _ieee_fp32() -> Iterator[None]:
    """Plain fp32 arithmetic for the comparison: on CUDA, cuDNN runs fp32 convolutions in TF32
    (a 10-bit mantissa) by default, which moved a probe's embeddings by up to 1.7e-3 on an H200
    and so failed every fold, with a warning at each held-out evaluation."""
    switches = _tf32_switches()
    old = [getattr(owner, name) for owner, name, _ in switches]
    for owner, name, plain in switches:
        setattr(owner, name, plain)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(switches, old, strict=True):
            setattr(owner, name, value)


def fold_batchnorm(
    model: EmbeddingModel, probe: torch.Tensor, atol: float = 1e-4
) -> EmbeddingModel:
    """A folded copy of `model` (eval mode, fp32) or `model` itself when nothing folds or the
    copy's embeddings of `probe` differ by more than `atol`."""
    model.eval()
    fast = copy.deepcopy(model).float()
    folded = sum(_fold_children(m) for m in list(fast.trunk.modules()))
    if not folded:
        return model
    fast.restage()  # the stage wrappers held the unfolded modules
    with torch.inference_mode(), _ieee_fp32():
        want, got = model.float().embed(probe), fast.embed(probe)
    if not torch.allclose(want, got, atol=atol):
        warnings.warn(
            f"BatchNorm folding changed {type(model.trunk).__name__}'s embeddings "
            f"(max diff {(want - got).abs().max():.2e}); embedding without it",
            stacklevel=2,
        )
        return model
    return fast.eval()
