"""Trunk stages of any timm model, from timm's own metadata, checked on a probe.

A stage list is a chain of modules whose composition is the trunk's `forward_features`; it
lets a frozen prefix run once (and be cached) while the rest trains. It comes from:

- `feature_info` (every timm model has it): the modules ending each feature level name the
  containers (`blocks`, `stages`, `layers`) whose children are the stages;
- one probe through `forward_features` with hooks: which children run, in which order;
- ViT-style trunks (`_pos_embed` is a method, not a module): a stem module that embeds the
  patches and adds the class/register tokens and positions exactly as timm does.

The chain is checked against `forward_features` on the probe; a trunk whose chain does not
reproduce it (Eva's rotary embeddings, say) has no stages, and freezing falls back to the
whole trunk. EfficientNet and ResNet layouts take a fast path with no probe.

Stage counts for `model.frozen_stages` are fine-grained (EfficientNet: stem, 7 block groups,
head = 9); `model.trainable_stages` counts timm's feature levels from the top instead (one per
`feature_info` entry: a resolution stage on CNNs, a block on ViTs), which means the same on
every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class TokenStem(nn.Module):
    """ViT-style stem as `forward_features` runs it: patch embedding, class/register/distill
    tokens and position embedding (`_pos_embed`), patch dropout, pre-norm.

    The token and position parameters are registered here too, so freezing the stem freezes
    them; the trunk itself is held unregistered (its other parameters belong to later stages).
    """

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self._trunk = [trunk]
        for name in ("patch_embed", "pos_drop", "patch_drop", "norm_pre"):
            module = getattr(trunk, name, None)
            if isinstance(module, nn.Module):
                self.add_module(name, module)
        for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            param = getattr(trunk, name, None)
            if isinstance(param, nn.Parameter):
                self.register_parameter(name, param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._trunk[0]
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))


@dataclass
class StagePlan:
    """Stages in order, the unit names each holds, and the stage ending each feature level."""

    stages: list[nn.Module]
    names: list[tuple[str, ...]]
    level_ends: list[int]

    def frozen_for(self, trainable: int) -> int:
        """Stages to freeze so that the top `trainable` feature levels train (0 when they are
        all of them)."""
        levels = len(self.level_ends)
        return 0 if trainable >= levels else self.level_ends[levels - trainable - 1] + 1


def _feature_modules(trunk: nn.Module) -> list[str]:
    info = getattr(trunk, "feature_info", None) or []
    return [f["module"] for f in info if isinstance(f, dict) and f.get("module")]


def _level_ends(names: list[tuple[str, ...]], features: list[str]) -> list[int] | None:
    """For each feature module, the index of the stage holding it (or a module inside it)."""
    ends = []
    for feature in features:
        hit = [i for i, units in enumerate(names)
               if any(feature == u or feature.startswith(u + ".") for u in units)]  # fmt: skip
        if not hit:
            return None
        ends.append(hit[0])
    return ends if ends == sorted(ends) else None


def _fast_path(trunk: nn.Module) -> tuple[list[nn.Module], list[tuple[str, ...]]] | None:
    """EfficientNet and ResNet layouts by attribute names: no probe needed."""
    children = set(dict(trunk.named_children()))
    if {"conv_stem", "bn1", "blocks", "conv_head", "bn2"} <= children:
        blocks = [(f"blocks.{i}",) for i in range(len(trunk.blocks))]
        stages = [nn.Sequential(trunk.conv_stem, trunk.bn1), *trunk.blocks,
                  nn.Sequential(trunk.conv_head, trunk.bn2)]  # fmt: skip
        return stages, [("conv_stem", "bn1"), *blocks, ("conv_head", "bn2")]
    if {"conv1", "bn1", "act1", "maxpool", "layer1", "layer4"} <= children:
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.act1, trunk.maxpool)
        layers = [getattr(trunk, f"layer{i}") for i in range(1, 5)]
        names = [("conv1", "bn1", "act1", "maxpool"), *[(f"layer{i}",) for i in range(1, 5)]]
        return [stem, *layers], names
    return None


def _probe(trunk: nn.Module) -> torch.Tensor:
    """An input the trunk accepts: its fixed size (ViT, Swin) or 64 px."""
    size = getattr(getattr(trunk, "patch_embed", None), "img_size", None) or (64, 64)
    size = (size, size) if isinstance(size, int) else tuple(size)
    param = next(trunk.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, *size, generator=gen).to(device)


def _call_order(trunk: nn.Module, features: list[str], x: torch.Tensor):
    """Units (children; the children of containers feature_info points into) in the order
    `forward_features` runs them, and its output. None when a unit runs twice."""
    containers = {f.split(".")[0] for f in features if "." in f}
    units = []
    for name, child in trunk.named_children():
        if name in containers and len(child) > 0:
            units += [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            units.append((name, child))
    order: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, mod)))
             for n, m in units]  # fmt: skip
    try:
        out = trunk.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    if len({n for n, _ in order}) != len(order):
        return None
    return order, containers, out


def _probe_path(trunk: nn.Module) -> tuple[list[nn.Module], list[tuple[str, ...]]] | None:
    """Stages from feature_info and one hooked probe, checked to compose to forward_features."""
    features = _feature_modules(trunk)
    if not features or not hasattr(trunk, "forward_features"):
        return None
    x = _probe(trunk)
    found = _call_order(trunk, features, x)
    if found is None:
        return None
    order, containers, want = found
    first_level = features[0]
    body = [i for i, (n, _) in enumerate(order)
            if n.split(".")[0] in containers or (n in features and n != first_level)]  # fmt: skip
    if not body:
        return None
    head, tail = order[: body[0]], order[body[-1] + 1 :]
    if hasattr(trunk, "_pos_embed") and hasattr(trunk, "patch_embed"):
        stem: list[tuple[str, nn.Module]] = [("patch_embed", TokenStem(trunk))]
        names = [("patch_embed", "pos_drop", "patch_drop", "norm_pre")]
    else:
        stem = [("stem", nn.Sequential(*[m for _, m in head]))] if head else []
        names = [tuple(n for n, _ in head)] if head else []
    stages = [m for _, m in stem] + [order[i][1] for i in range(body[0], body[-1] + 1)]
    names += [(order[i][0],) for i in range(body[0], body[-1] + 1)]
    if tail:
        stages.append(nn.Sequential(*[m for _, m in tail]))
        names.append(tuple(n for n, _ in tail))
    got = x
    for stage in stages:
        got = stage(got)
    if got.shape != want.shape or (
        got.device.type != "meta" and not torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    ):
        return None
    return stages, names


def stage_plan(trunk: nn.Module) -> StagePlan | None:
    """The trunk's stages and feature levels, or None when no split is known for it."""
    found = _fast_path(trunk)
    if found is None:
        was_training = trunk.training
        trunk.eval()
        try:
            with torch.no_grad():
                found = _probe_path(trunk)
        except Exception:  # noqa: BLE001 - a trunk the probe cannot split has no stages
            found = None
        finally:
            trunk.train(was_training)
    if found is None:
        return None
    stages, names = found
    ends = _level_ends(names, _feature_modules(trunk))
    if not ends:  # no usable feature levels: every stage is a level
        ends = list(range(len(stages)))
    return StagePlan(stages, names, ends)
