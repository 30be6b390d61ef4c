"""The optimizer and learning-rate schedule from the config, checked before anything slow:
a misspelt optimizer or argument fails in milliseconds, naming the key and what it takes."""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import replace

import timm.optim
import timm.scheduler
import torch
from timm.scheduler.scheduler import Scheduler

from mltrain.config import Config
from mltrain.errors import ConfigError
from mltrain.model.network import (
    check_backbone_name,
    check_patch_size,
    check_pooling_fits,
    check_pretrained,
)


def make_optimizer(
    cfg: Config, model: torch.nn.Module, loss: torch.nn.Module | None = None, strict: bool = True
) -> torch.optim.Optimizer:
    """timm's optimizer over the model (with `train.layer_decay`, earlier layers learn slower),
    plus the loss's own parameters (proxies, class centres) in a group of their own at
    `train.loss_lr`: proxies need about 100x the backbone's rate to keep up with it."""
    t = cfg.train
    args = dict(t.optimizer.get("args") or {})
    name = t.optimizer["name"]
    try:
        optimizer = timm.optim.create_optimizer_v2(
            model, opt=name, layer_decay=t.layer_decay, **args
        )
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(f"train.optimizer: {_optimizer_problem(name, e)}") from None
    owned = [p for p in loss.parameters() if p.requires_grad] if loss is not None else []
    if strict and t.loss_lr is not None and loss is not None and not owned:
        raise ConfigError(
            f"train.loss_lr: {t.loss['name']} has no parameters of its own (proxies, class "
            "centres), so loss_lr would change nothing; remove it"
        )
    if owned:
        base = optimizer.defaults["lr"]  # timm's schedulers scale each group's base by lr_scale
        scale = (t.loss_lr or base) / base
        optimizer.add_param_group({"params": owned, "lr": base, "lr_scale": scale})
    return optimizer


def _optimizer_problem(name: str, e: Exception) -> str:
    """What is wrong, naming only the few names that matter: close matches for an unknown
    optimizer, the accepted arguments for an unknown argument."""
    known = timm.optim.list_optimizers()
    if name.lower().split("_")[-1] not in known and name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
        similar = f"; similar: {', '.join(close)}" if close else ""
        return (f"unknown optimizer {name!r}{similar} (all {len(known)} names: "
                "python -c 'import timm.optim; print(timm.optim.list_optimizers())')")  # fmt: skip
    arg = re.search(r"unexpected keyword argument '(\w+)'", str(e))
    if arg:
        try:
            sig = inspect.signature(timm.optim.get_optimizer_class(name))
            valid = [p for p in sig.parameters if p not in ("self", "params")]
        except Exception:  # noqa: BLE001 - only the hint is lost
            valid = []
        takes = f"; it takes {', '.join(valid)}" if valid else ""
        return f"{name} has no argument {arg.group(1)!r} (train.optimizer.args){takes}"
    return f"{name}: {e}"


def check_optimization(cfg: Config) -> None:
    """Check the backbone name and weights, and build the optimizer and scheduler once for a
    one-parameter model: a bad name or argument fails in milliseconds, before a run folder,
    data checks or a model exist."""
    check_backbone_name(cfg.model.backbone)
    check_pretrained(cfg.model.backbone, cfg.model.pretrained)
    check_patch_size(cfg.model.backbone, cfg.model.image_size)
    check_pooling_fits(cfg.model)  # its name and args, and a grid within the last feature map
    # One parameter has no layers to decay (timm would warn so): layer_decay waits for the model.
    cfg = replace(cfg, train=replace(cfg.train, layer_decay=None))
    try:
        optimizer = make_optimizer(cfg, torch.nn.Linear(1, 1))
        make_scheduler(cfg, optimizer, 1)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - args that need the real model (layer_decay): checked then
        pass


def make_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, updates_per_epoch: int
) -> Scheduler:
    """timm's scheduler, stepped per optimizer update (`step_update`) so warmup and decay are
    smooth within an epoch, and per epoch (`step`) for the epoch-based names."""
    args = dict(cfg.train.scheduler.get("args") or {})
    try:
        sched, _ = timm.scheduler.create_scheduler_v2(
            optimizer,
            sched=cfg.train.scheduler["name"],
            num_epochs=cfg.train.epochs,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
            **args,
        )
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(
            f"train.scheduler: {e}; valid names: cosine, step, multistep, plateau, poly, tanh"
        ) from None
    if sched is None:
        raise ConfigError(f"train.scheduler: unknown name {cfg.train.scheduler['name']!r}")
    return sched
