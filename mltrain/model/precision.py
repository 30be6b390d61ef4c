"""Per-layer precision under CPU bf16 autocast: large-kernel depthwise convolutions train in fp32.

On an AVX512-BF16 CPU, oneDNN's bf16 backward of a large-kernel (5x5 and up) depthwise
convolution is several times slower than its fp32 backward, while 3x3 depthwise and the
pointwise convolutions, which hold most of the FLOPs, gain from bf16. So only the depthwise
layers with kernels of 5 or more run in fp32, and only when a backward pass will go through
them: this beats both plain bf16 and every depthwise layer in fp32 (the README's training
table has today's figures).

Forward-only passes (inference, frozen layers) keep bf16: there the fp32 depthwise forward is
the slower one.

The switch patches `forward` on the instances, so module classes, state-dict keys and
checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def _cpu_bf16_autocast() -> bool:
    try:
        on, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):  # torch < 2.4
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return on and dtype == torch.bfloat16


class Fp32WhenTrained:
    """The `forward` of one convolution: fp32 when a backward pass will go through it under
    CPU bf16 autocast, the class's own forward otherwise. An object rather than a bound
    closure so that a patched model still pickles and deep-copies onto its copy."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        backward = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
        if backward and x.device.type == "cpu" and _cpu_bf16_autocast():
            with torch.autocast("cpu", enabled=False):
                return type(conv).forward(conv, x.float())
        return type(conv).forward(conv, x)


MIN_KERNEL = 5  # 3x3 depthwise backward is fast enough in bf16 (measured, see above)


def is_depthwise(module: nn.Module) -> bool:
    """One filter per input channel (groups == in_channels)."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels


def slow_in_bf16(module: nn.Module) -> bool:
    """A layer whose bf16 backward is slower than its fp32 one on AVX512-BF16 CPUs."""
    return is_depthwise(module) and max(module.kernel_size) >= MIN_KERNEL


def depthwise_in_fp32(model: nn.Module) -> int:
    """Make the large-kernel depthwise convolutions of `model` run in fp32 when they will be
    backpropagated under CPU autocast (GPU and fp32 runs are unaffected). Returns how many
    were switched."""
    count = 0
    for module in model.modules():
        if slow_in_bf16(module):
            module.forward = Fp32WhenTrained(module)
            count += 1
    return count
