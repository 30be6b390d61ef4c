"""The training step loop and embedding extraction: one readable loop each."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mltrain.errors import MltrainError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MltrainError("train.device: cuda requested but no CUDA device is available")
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


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.bfloat16:  # cached prefix features; autocast casts back as needed
        x = x.float()
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class StepState:
    """Counters that a checkpoint carries so a resumed run continues exactly."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken
    bad_steps_in_row: int = 0
    bad_steps_total: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class NonFiniteLoss(MltrainError):
    """Too many NaN/inf losses in a row: training cannot go on."""


@dataclass
class LoopSettings:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool = True
    grad_accum: int = 1
    grad_clip: float | None = None
    max_steps: int | None = None
    max_bad_steps: int = 5
    from_prefix: bool = False  # batches hold cached prefix features, not images
    show_progress: bool = True


def train_one_epoch(
    model: nn.Module,
    criterion: Callable,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: StepState,
    cfg: LoopSettings,
    log: Callable[[str, float, int], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, images/s and the share of time spent waiting
    for data. Non-finite losses skip the step; `max_bad_steps` in a row stop the run."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, count, images, wait = 0.0, 0, 0, 0.0
    start = tick = time.perf_counter()
    bar = tqdm(
        loader,
        desc=f"epoch {state.epoch + 1}",
        leave=False,
        dynamic_ncols=True,
        disable=not cfg.show_progress,
    )
    for i, (x, y, _) in enumerate(bar):
        wait += time.perf_counter() - tick
        x, y = to_device(x, cfg.device, cfg.channels_last), y.to(cfg.device)
        with autocast(cfg.device, cfg.amp_dtype):
            emb = model(x, from_prefix=cfg.from_prefix)
        loss = criterion(emb.float(), y, getattr(getattr(model, "module", model), "head", None))
        if not torch.isfinite(loss):
            _count_bad_step(state, cfg, optimizer)
            tick = time.perf_counter()
            continue
        state.bad_steps_in_row = 0
        (loss / cfg.grad_accum).backward()
        if (i + 1) % cfg.grad_accum == 0:
            _optimizer_step(model, optimizer, scheduler, state, cfg)
            if log:
                log("train/loss", loss.item(), state.step)
                log("train/lr", optimizer.param_groups[0]["lr"], state.step)
        total, count, images = total + loss.item(), count + 1, images + len(y)
        bar.set_postfix(
            loss=f"{total / count:.4f}", img_s=f"{images / (time.perf_counter() - start):.1f}"
        )
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            break
        tick = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - start
    return {
        "loss": total / max(count, 1),
        "images_per_s": images / max(elapsed, 1e-9),
        "data_wait_share": wait / max(elapsed, 1e-9),
    }


def _optimizer_step(model, optimizer, scheduler, state: StepState, cfg: LoopSettings) -> None:
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if scheduler is not None:
        scheduler.step_update(num_updates=state.step)


def _count_bad_step(state: StepState, cfg: LoopSettings, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    state.bad_steps_in_row += 1
    state.bad_steps_total += 1
    if state.bad_steps_in_row >= cfg.max_bad_steps:
        raise NonFiniteLoss(
            f"{state.bad_steps_in_row} non-finite losses in a row at step {state.step}; "
            "lower train.optimizer.args.lr or set train.grad_clip. The last good checkpoint "
            "is kept."
        )


@torch.inference_mode()
def run_batches(
    fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fn` over every batch in loader order: (outputs on CPU, labels, dataset indices)."""
    outs, labels, indices = [], [], []
    for x, y, idx in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        x = to_device(x, device, channels_last)
        with autocast(device, amp_dtype):
            outs.append(fn(x).cpu())
        labels.append(torch.as_tensor(y))
        indices.append(torch.as_tensor(idx))
    if not outs:
        raise MltrainError("nothing to embed: the image list is empty")
    return torch.cat(outs), torch.cat(labels), torch.cat(indices)


def extract_embeddings(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = True,
    from_prefix: bool = False,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings float32, labels, dataset indices) in loader order, with a progress bar."""
    model.eval()
    emb, labels, indices = run_batches(
        lambda x: model.embed(x, from_prefix=from_prefix).float(),
        loader,
        device,
        amp_dtype,
        channels_last,
        desc,
    )
    emb = emb.numpy().astype(np.float32, copy=False)
    if not np.isfinite(emb).all():
        raise MltrainError("embeddings contain NaN/inf; the checkpoint's weights are broken")
    return emb, labels.numpy(), indices.numpy()


def compute_prefix(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype,
    channels_last: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs of the frozen stages for every image, stored in bf16 to halve the memory."""
    model.eval()
    return run_batches(
        lambda x: model.prefix(x).to(torch.bfloat16), loader, device, amp_dtype, channels_last, desc
    )
