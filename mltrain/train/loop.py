"""The training step loop: one readable loop over batches, with resumable RNG and step state."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mltrain.errors import MltrainError
from mltrain.inference.batching import run_batches, to_device
from mltrain.progress import progress
from mltrain.runtime import InferSpec, autocast


@dataclass
class StepState:
    """Counters that a checkpoint carries so a resumed run continues exactly."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken
    bad_steps_in_row: int = 0
    bad_steps_total: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Where an interrupted epoch stopped (non-zero only in a checkpoint saved on SIGINT or
    # SIGTERM): batches of epoch `epoch` already trained, their loss sum and count (so the
    # epoch's mean loss is the uninterrupted one) and the RNG states at that point.
    batches_done: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    rng: dict[str, Any] | None = None


def rng_state() -> dict[str, Any]:
    """The torch (CPU, and CUDA once used), numpy and python global RNG states, as tensors and
    plain lists so that a `weights_only` checkpoint can hold them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Undo of `rng_state`; CUDA states are restored when the device count matches."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


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
    stop: threading.Event | None = None  # set (by a signal handler): stop after this step


def train_one_epoch(
    model: nn.Module,
    criterion: Callable,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: StepState,
    settings: LoopSettings,
    log: Callable[[str, float, int], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, images/s and the share of time spent waiting
    for data. Non-finite losses skip the step; `max_bad_steps` in a row stop the run.

    A set `settings.stop` ends the pass after the next optimizer step, leaving the position in
    `state.batches_done`; called again with that state, the pass resumes there exactly."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    batches = _skip_done(loader, state)
    images, wait = 0, 0.0
    start = tick = time.perf_counter()
    bar = progress(  # the epoch's closing line is the caller's (with held-out figures)
        batches,
        desc=f"epoch {state.epoch + 1}",
        total=len(loader) if isinstance(loader, Sized) else None,
        initial=state.batches_done,
        enabled=settings.show_progress,
        end_line=False,
    )
    stopped = False
    step_loss, step_batches = 0.0, 0  # micro-batches accumulated into the next optimizer step
    for x, y, _ in bar:
        state.batches_done += 1
        wait += time.perf_counter() - tick
        x, y = to_device(x, settings.device, settings.channels_last), y.to(settings.device)
        with autocast(settings.device, settings.amp_dtype):
            emb = model(x, from_prefix=settings.from_prefix)
        net = getattr(model, "module", model)  # DDP wraps it
        logits = net.logits if getattr(net, "head", None) is not None else None
        loss = criterion(emb.float(), y, logits)
        if not torch.isfinite(loss):
            _count_bad_step(state, settings, optimizer)
            tick = time.perf_counter()
            continue
        state.bad_steps_in_row = 0
        (loss / settings.grad_accum).backward()
        value = loss.item()
        step_loss, step_batches = step_loss + value, step_batches + 1
        stepped = state.batches_done % settings.grad_accum == 0
        if stepped:
            lr = optimizer.param_groups[0]["lr"]  # the rate this step was taken with
            _optimizer_step(model, optimizer, scheduler, state, settings)
            if log:  # one point per optimizer step, at the step's number (1, 2, ...)
                log("train/loss", step_loss / step_batches, state.step)
                log("train/lr", lr, state.step)
            step_loss, step_batches = 0.0, 0
        state.loss_sum, state.loss_count = state.loss_sum + value, state.loss_count + 1
        images += len(y)
        bar.set_postfix(
            loss=f"{state.loss_sum / state.loss_count:.4f}",
            img_s=f"{images / (time.perf_counter() - start):.1f}",
        )
        if settings.max_steps is not None and state.step >= settings.max_steps:
            break
        if stepped and settings.stop is not None and settings.stop.is_set():
            stopped = True  # the caller saves the position; nothing is half-accumulated
            break
        tick = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - start
    stats = {
        "loss": state.loss_sum / max(state.loss_count, 1),
        "images_per_s": images / max(elapsed, 1e-9),
        "data_wait_share": wait / max(elapsed, 1e-9),
    }
    if not stopped:  # the pass is over: the next call starts a new epoch
        state.batches_done, state.loss_sum, state.loss_count = 0, 0.0, 0
    return stats


def _skip_done(loader: Iterable, state: StepState) -> Iterator:
    """`loader` past the `state.batches_done` batches an interrupted epoch already trained.

    They are drawn and dropped without running the model, so the sampler order and the
    augmentation streams (in workers too) stay those of an uninterrupted epoch; then the RNG
    states saved at the interrupt come back (dropout and the like draw from them)."""
    batches = iter(loader)
    for _ in range(state.batches_done):
        if next(batches, None) is None:
            raise MltrainError(
                f"cannot resume at batch {state.batches_done} of epoch {state.epoch + 1}: the "
                "epoch now has fewer batches (data or train.batch_size changed since the "
                "checkpoint); resume without overrides that change them"
            )
    if state.rng is not None:
        set_rng_state(state.rng)
        state.rng = None
    return batches


def _optimizer_step(model, optimizer, scheduler, state: StepState, settings: LoopSettings) -> None:
    if settings.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if scheduler is not None:
        scheduler.step_update(num_updates=state.step)


def _count_bad_step(state: StepState, settings: LoopSettings, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    state.bad_steps_in_row += 1
    state.bad_steps_total += 1
    if state.bad_steps_in_row >= settings.max_bad_steps:
        raise NonFiniteLoss(
            f"{state.bad_steps_in_row} non-finite losses in a row at step {state.step}; "
            "lower train.optimizer.args.lr or set train.grad_clip. The last good checkpoint "
            "is kept."
        )


def compute_prefix(
    model: nn.Module,
    loader: Iterable,
    spec: InferSpec,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs of the frozen stages for every image, stored in bf16 to halve the memory."""
    model.eval()
    return run_batches(lambda x: model.prefix(x).to(torch.bfloat16), loader, spec, desc)
