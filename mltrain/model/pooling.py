"""Poolings from any trunk output to one vector per image.

CNNs give (B, C, H, W) maps (Swin: (B, H, W, C)); transformers give (B, N, C) tokens whose
first `num_prefix_tokens` are class/register/distillation tokens, not image patches. Each
pooling is told the trunk's layout once (`configure`) and reduces over the patches only.
"""

from __future__ import annotations

import torch
from torch import nn

from mltrain.errors import ConfigError
from mltrain.registry import Registry

POOLINGS = Registry("pooling")


class Pooling(nn.Module):
    """Base: `patches` turns any layout into (B, C, L) over image positions only."""

    tokens_only = False  # cls and mean_tokens need a token trunk
    cells = 1  # vectors per image, concatenated: the embedding is cells x the trunk's width

    def __init__(self) -> None:
        super().__init__()
        self.layout = "NCHW"  # NCHW | NHWC | NLC (tokens)
        self.num_prefix_tokens = 0

    def configure(self, layout: str, num_prefix_tokens: int, name: str, family: str = "") -> None:
        """Set the trunk's output layout; a token-only pooling on a map trunk is a ConfigError."""
        if self.tokens_only and layout != "NLC":
            raise ConfigError(
                f"model.pooling: {name} needs token outputs (ViT, DeiT, DINOv2); "
                f"{family or 'this backbone'} gives feature maps; use avg or gem",
                key="model.pooling",
            )
        self.layout, self.num_prefix_tokens = layout, num_prefix_tokens

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # tokens, also from trunks that do not say so (MLP-Mixer)
            return x[:, self.num_prefix_tokens :].transpose(1, 2)
        if self.layout == "NHWC":
            return x.flatten(1, 2).transpose(1, 2)
        return x.flatten(2)


class AvgPool(Pooling):
    """Mean over image positions (patch tokens on a transformer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patches(x).mean(dim=-1)


class MaxPool(Pooling):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patches(x).amax(dim=-1)


class MeanTokens(AvgPool):
    """Mean of the patch tokens (prefix tokens skipped): `avg` restricted to transformers."""

    tokens_only = True


class ClassToken(Pooling):
    """The class token, what a ViT's classifier reads."""

    tokens_only = True

    def configure(self, layout: str, num_prefix_tokens: int, name: str, family: str = "") -> None:
        super().configure(layout, num_prefix_tokens, name, family)
        if num_prefix_tokens < 1:
            raise ConfigError("model.pooling: cls needs a class token and this transformer has "
                              "none; use mean_tokens or gem", key="model.pooling")  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class GeM(Pooling):
    """Generalised mean pooling: p=1 is average pooling, large p approaches max pooling."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        pooled = self.patches(x).float().clamp(min=self.eps).pow(p).mean(dim=-1)
        return pooled.pow(1.0 / p)


class GridPool(Pooling):
    """Means over a `size` x `size` grid of image regions, concatenated: keeps where in the
    image a feature fired, which one global mean discards. On handwriting, where a stroke sits
    is what tells two characters apart. The embedding is `size`**2 times the trunk's width."""

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        if type(size) is not int or not 1 <= size <= 8:
            raise ConfigError(f"model.pooling.args.size: {size!r} is not a grid side from 1 to 8; "
                              "use 2 (a 2 x 2 grid)", key="model.pooling")  # fmt: skip
        self.size = size
        self.cells = size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self._map(x)
        h, w, g = grid.shape[-2], grid.shape[-1], self.size
        if h < g or w < g:
            raise ConfigError(f"model.pooling: grid size {g} needs feature maps of {g} x {g} or "
                              f"more, got {h} x {w}; use a smaller size or larger images "
                              "(model.image_size)", key="model.pooling")  # fmt: skip
        rows = [(h * i // g, h * (i + 1) // g) for i in range(g)]
        cols = [(w * j // g, w * (j + 1) // g) for j in range(g)]
        cells = [grid[:, :, a:b, c:d].mean(dim=(2, 3)) for a, b in rows for c, d in cols]
        return torch.cat(cells, dim=1)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) whatever the trunk's layout; tokens must form a square."""
        if x.dim() == 4:
            return x.permute(0, 3, 1, 2) if self.layout == "NHWC" else x
        patches = self.patches(x)
        side = int(round(patches.shape[-1] ** 0.5))
        if side * side != patches.shape[-1]:
            raise ConfigError(f"model.pooling: grid needs a square of patch tokens, got "
                              f"{patches.shape[-1]}; use avg", key="model.pooling")  # fmt: skip
        return patches.unflatten(-1, (side, side))


POOLINGS.register("avg", AvgPool)
POOLINGS.register("max", MaxPool)
POOLINGS.register("gem", GeM)
POOLINGS.register("cls", ClassToken)
POOLINGS.register("mean_tokens", MeanTokens)
POOLINGS.register("grid", GridPool)


def trunk_layout(trunk: nn.Module, output: torch.Tensor | None = None) -> str:
    """NLC for token outputs, NHWC for trunks that say so (Swin), NCHW otherwise."""
    if output is not None and output.dim() == 3:
        return "NLC"
    if output is None and hasattr(trunk, "num_prefix_tokens") and hasattr(trunk, "blocks"):
        return "NLC"
    return "NHWC" if getattr(trunk, "output_fmt", "NCHW") == "NHWC" else "NCHW"
