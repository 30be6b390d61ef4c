"""Per-layer precision under CPU bf16 autocast: depthwise convolutions train in fp32.

On an AVX512-BF16 CPU, oneDNN's bf16 backward of a depthwise convolution is about 2.5x slower
than its fp32 backward (profiled: `convolution_backward` 1.13 s against 0.45 s per step),
while the pointwise convolutions that hold most of the FLOPs gain from bf16. Running only the
depthwise layers in fp32 when a backward pass will go through them gives, per training step of
`tf_efficientnet_lite0` at batch 32 (`/tmp` micro-benchmark, 2 cores):

- whole network: 21.1-22.2 img/s against 16.2-17.2 in plain bf16 and 15.1-16.0 in fp32;
- the stage-6 tail on cached features: 155-163 img/s against 65 in bf16 and 121 in fp32.

Forward-only passes (inference, frozen layers) keep bf16: there the fp32 depthwise forward
is the slower one (63 against 123 img/s on one thread).

The switch patches `forward` on the instances, so module classes, state-dict keys and
checkpoints are unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _cpu_autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    backward = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
    if backward and x.device.type == "cpu" and _cpu_autocast_on():
        with torch.autocast("cpu", enabled=False):
            return type(self).forward(self, x.float())
    return type(self).forward(self, x)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels


def depthwise_in_fp32(model: nn.Module) -> int:
    """Make every depthwise convolution of `model` run in fp32 when it will be backpropagated
    under CPU autocast (GPU and fp32 runs are unaffected). Returns how many were switched."""
    count = 0
    for module in model.modules():
        if is_depthwise(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
