"""Where the model runs: the device, the autocast precision, and how inference is placed.

Training, evaluation, export and search all resolve `train.device` and `train.amp` here, so
every entry point picks the same device and precision for the same config.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

from mltrain.config import Config
from mltrain.cpus import usable_cpus as usable_cpus  # re-exported: callers import it here
from mltrain.errors import MltrainError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MltrainError(
            "train.device: cuda requested but no CUDA device is available; use --set "
            "train.device=auto (or cpu)"
        )
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays off only with native bf16 instructions (AVX512-BF16 / AMX)."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "AVX512" in capability
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.amp`; `auto` picks bf16 where the hardware has it."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


@dataclass(frozen=True)
class InferSpec:
    """Where and how batches run through the model during inference."""

    device: torch.device
    amp: torch.dtype | None
    channels_last: bool = True
    cpu_chunk: int = 0  # images per model call on CPU; 0 = the whole batch
    in_workers: bool = False  # on CPU, run the model inside the loader's worker processes
    flip: bool = False  # embed each image and its mirror, and average (eval.flip_tta)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def workers_can_run_model() -> bool:
    """Forked workers that inherit the model: Linux only (fork elsewhere is unsafe or absent)."""
    return sys.platform.startswith("linux")


def infer_spec(cfg: Config, device: torch.device, amp: torch.dtype | None) -> InferSpec:
    """How inference runs for this config (see `mltrain.inference.batching`)."""
    e = cfg.eval
    return InferSpec(
        device, amp, cfg.train.channels_last, e.cpu_chunk, e.model_in_workers, e.flip_tta
    )


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a config's model runs, worked out once from the config:
    training and inference read the same device and placement instead of each resolving
    `train.device`, `train.amp` and `eval.*` again."""

    device: torch.device
    train_amp: torch.dtype | None  # autocast dtype of training steps (`train.amp`)
    infer_amp: torch.dtype | None  # of inference passes: held-out, prefix cache (`eval.amp`)
    infer: InferSpec  # where and how inference batches run

    @classmethod
    def from_config(cls, cfg: Config) -> Runtime:
        device = resolve_device(cfg.train.device)
        infer_amp = resolve_amp(cfg.eval.amp, device)
        return cls(device, resolve_amp(cfg.train.amp, device), infer_amp,
                   infer_spec(cfg, device, infer_amp))  # fmt: skip
