"""Config checks the types alone cannot express: choices, numeric ranges, finite numbers, the
loader workers this machine can run, and rules between keys. A bad value fails here, naming
its key, not later deep inside a library."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mltrain.config_schema import (
    BEST_METRICS,
    CHOICES,
    CLASS_TURNS,
    RANGES,
    Bound,
    Config,
    DataConfig,
    ModelConfig,
    Spec,
    best_metric_k,
    to_dict,
)
from mltrain.errors import ConfigError

WORKERS_PER_CORE = 4  # loader workers mostly wait on decoding and disk: a few per core pay
WORKER_MEMORY = 256 * 2**20  # bytes a forked loader worker comes to hold (its own pages)


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when
    lower; None where neither is known."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        total = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total or int(limit), int(limit))
    except OSError:
        pass
    return total


def max_loader_workers() -> int:
    """The most DataLoader workers this machine can run: `WORKERS_PER_CORE` per core (at
    least 8) and no more than its memory holds at `WORKER_MEMORY` each. Every worker is a
    forked process: 100,000 of them would end in the OOM killer, not an error."""
    cores_bound = max(8, WORKERS_PER_CORE * machine_cores())
    memory = machine_memory()
    return max(1, min(cores_bound, memory // WORKER_MEMORY if memory else cores_bound))


def _number(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _range_text(b: Bound) -> str:
    if b.high is None:
        text = f"at least {_number(b.low)}"
    elif b.low is None:
        text = f"at most {_number(b.high)}"
    else:
        text = f"between {_number(b.low)} and {_number(b.high)}"
    return text + (f" ({b.why})" if b.why else "")


def _check_ranges(cfg: Config) -> None:
    """Every key of `RANGES`, and data.num_workers against this machine."""
    for key, bound in RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        if (bound.low is not None and value < bound.low) or (
            bound.high is not None and value > bound.high
        ):
            raise ConfigError(f"{key}: must be {_range_text(bound)}, got {_number(value)}")
    workers = cfg.data.num_workers
    if workers is not None:
        most = max_loader_workers()
        if not 0 <= workers <= most:
            raise ConfigError(
                f"data.num_workers: {workers:,} is not a worker count this machine runs; use "
                f"0 to {most} ({machine_cores()} cores, {WORKERS_PER_CORE} workers a core, "
                f"{WORKER_MEMORY // 2**20} MiB of memory each), or leave it out (null: "
                "min(cores, 4))"
            )


def _check_finite(data: Any, key: str) -> None:
    """No NaN or infinity anywhere in a config (optimizer, loss and index arguments too):
    `lr: 1e400` reads as infinity, and an infinite or NaN setting fails far from its key."""
    if isinstance(data, float) and not math.isfinite(data):
        why = " (1e400 and beyond read as infinity)" if math.isinf(data) else ""
        raise ConfigError(f"{key}: {data} is not a finite number; write a finite one{why}")
    if isinstance(data, dict):
        for name, value in data.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            _check_finite(value, f"{key}[{i}]")


def validate(cfg: Config) -> Config:
    """Range and choice checks that the types alone cannot express."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    _check_finite(to_dict(cfg), "")
    _check_ranges(cfg)
    if cfg.data.split != "none" and not 0 < cfg.data.train_fraction < 1:
        raise ConfigError(f"data.train_fraction: must be in (0, 1), got {cfg.data.train_fraction}")
    lr = cfg.train.optimizer.get("args", {}).get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"train.optimizer.args.lr: must be a positive number, got {lr!r}")
    _check_numeric_args(cfg.train.optimizer.get("args") or {}, "train.optimizer.args")
    if cfg.train.loss_lr is not None and cfg.train.loss_lr <= 0:
        raise ConfigError(f"train.loss_lr: must be a positive number, got {cfg.train.loss_lr}")
    if cfg.train.layer_decay is not None and not 0 < cfg.train.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay: must be in (0, 1], got {cfg.train.layer_decay}")
    if any(k < 1 for k in cfg.eval.ks):
        raise ConfigError(f"eval.ks: every k must be at least 1, got {cfg.eval.ks}")
    if any(n < 1 for n in cfg.eval.pca_lengths):
        raise ConfigError(
            f"eval.pca_lengths: lengths must be at least 1, got {cfg.eval.pca_lengths}"
        )
    if cfg.model.crop_pct is not None and not 0 < cfg.model.crop_pct <= 1:
        raise ConfigError(f"model.crop_pct: must be in (0, 1], got {cfg.model.crop_pct}")
    if cfg.model.crop_mode not in (None, "auto", "center", "squash", "border"):
        raise ConfigError(
            f"model.crop_mode: {cfg.model.crop_mode!r} is not one of auto, center, squash, border"
        )
    if not BEST_METRICS.fullmatch(cfg.train.best_metric):
        raise ConfigError(
            f"train.best_metric: {cfg.train.best_metric!r} is not a held-out metric; use map_at_r, "
            "precision_at_<k>, recall_at_<k>, r_precision, mean_average_precision, eer or roc_auc"
        )
    k = best_metric_k(cfg.train.best_metric)
    if k is not None and k not in cfg.eval.ks:
        raise ConfigError(
            f"train.best_metric: {cfg.train.best_metric} needs {k} in eval.ks (now "
            f"{cfg.eval.ks}); add it, e.g. --set 'eval.ks={sorted({*cfg.eval.ks, k})}'"
        )
    depth = cfg.data.class_depth
    if depth != "auto" and (not isinstance(depth, int) or depth < 1):
        raise ConfigError(f"data.class_depth: expected auto or an integer >= 1, got {depth!r}")
    if cfg.model.bnneck and (not cfg.model.head or cfg.train.loss["name"] == "cross_entropy"):
        raise ConfigError(
            "model.bnneck: the hybrid trains a metric loss and a classifier together; set "
            "model.head: true and a metric train.loss (e.g. TripletMarginLoss)"
        )
    _check_stages(cfg.model)
    if cfg.train.cache_frozen and not cfg.model.frozen_stages and not cfg.model.trainable_stages:
        raise ConfigError("train.cache_frozen needs a frozen prefix: set model.trainable_stages "
                          "(or model.frozen_stages > 0)")  # fmt: skip
    _check_name(cfg.name)
    _check_gem(cfg.model.pooling)
    _check_val_fraction(cfg.data)
    _check_class_augment(cfg.data.class_augment, cfg.data.augment, cfg.eval.flip_tta)
    if cfg.data.split_by == "parent" and cfg.data.split != "class_disjoint":
        raise ConfigError(f"data.split_by parent: whole parent folders go to one side only with "
                          f"data.split=class_disjoint (now {cfg.data.split}); set it, or "
                          "data.split_by=class")  # fmt: skip
    return cfg


# data.augment transforms that would turn a class into one of its turned copies
# (SquareSymmetry is albumentations' newer name for D4; Transpose and VerticalFlip mirror too)
_ROTATES = ("RandomRotate90", "D4", "SquareSymmetry")
_UNDOES = {"mirror": ("HorizontalFlip", "VerticalFlip", "Transpose", "D4", "SquareSymmetry"),
           "rotate90": _ROTATES, "rotate180": _ROTATES, "rotate270": _ROTATES}  # fmt: skip


def _check_class_augment(names: list[str], augment: list[Spec], flip_tta: bool) -> None:
    """Each a known turn, none twice (a repeat would make two classes of one), and nothing
    that undoes a turn: an augmentation that turns an image the same way would make a class's
    copy of itself, and mirror averaging (eval.flip_tta) embeds mirrors alike."""
    for name in names:
        if name not in CLASS_TURNS:
            raise ConfigError(f"data.class_augment: {name!r} is not one of "
                              f"{', '.join(CLASS_TURNS)}")  # fmt: skip
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"data.class_augment: {', '.join(repeated)} listed more than once; "
                          "list each turn once")  # fmt: skip
    used = {a.get("name") for a in augment if isinstance(a, dict)}
    for name in names:
        clash = sorted(used & set(_UNDOES[name]))
        if clash:
            raise ConfigError(f"data.class_augment {name}: data.augment's {clash[0]} turns "
                              f"images the same way, so a class would also train as its "
                              f"{name} copy; drop one of the two")  # fmt: skip
    if "mirror" in names and flip_tta:
        raise ConfigError("eval.flip_tta embeds each image as the mean of it and its mirror, "
                          "while data.class_augment mirror trains mirrors as other classes; "
                          "drop one of the two")  # fmt: skip


def _check_val_fraction(d: DataConfig) -> None:
    """data.val_fraction: auto, or a share of the classes that leaves some to train on."""
    v = d.val_fraction
    if isinstance(v, str):
        if v != "auto":
            raise ConfigError(f"data.val_fraction: expected auto or a number in [0, 1), got {v!r}")
        return
    if not 0 <= v < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1) (0 = no validation), got {v}")
    if v > 0 and d.split != "class_disjoint":
        raise ConfigError(
            f"data.val_fraction {v}: validation classes need data.split=class_disjoint (now "
            f"{d.split}); set data.val_fraction=0 or auto"
        )
    if v > 0 and v >= d.train_fraction:
        raise ConfigError(
            f"data.val_fraction {v} must be below data.train_fraction {d.train_fraction} (the "
            "validation classes come from the non-test side); lower it or raise train_fraction"
        )


NAME_MAX_CHARS = 128  # a run name is a folder name: file systems take 255 bytes at most


def _check_stages(model: ModelConfig) -> None:
    """frozen_stages and trainable_stages both say what trains: one at a time."""
    if model.trainable_stages is None:
        return
    # 0 counts no stages: runs saved with `frozen_stages: 0` beside trainable_stages still load
    if model.frozen_stages:
        raise ConfigError(f"model.trainable_stages: set it or model.frozen_stages, not both "
                          f"(now {model.trainable_stages} and {model.frozen_stages}); to count "
                          "frozen stages add --set model.trainable_stages=null")  # fmt: skip
    if model.trainable_stages < 1:
        raise ConfigError(f"model.trainable_stages: must be at least 1, got "
                          f"{model.trainable_stages}; to freeze the whole trunk use "
                          "train.freeze_backbone_epochs")  # fmt: skip


def _check_name(name: str) -> None:
    """`name` is one folder under output_dir: a path in it would put runs elsewhere, and a
    name the file system cannot hold (too long, control characters) would fail only when the
    run folder is made, in a message as long as the name."""
    shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name):,} characters)"
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"name: {shown} must be a single folder name (no '/', not '..'); "
                          "use output_dir to choose where runs go")  # fmt: skip
    if len(name) > NAME_MAX_CHARS or len(name.encode("utf-8", "replace")) > 255:
        raise ConfigError(f"name: {shown} is too long for a folder name; use at most "
                          f"{NAME_MAX_CHARS} characters")  # fmt: skip
    odd = [c for c in name if not c.isprintable()]
    if odd:
        raise ConfigError(f"name: {shown} holds control or invisible characters ({odd[0]!r}); "
                          "use letters, digits, '-', '_' and '.'")  # fmt: skip


def _check_gem(pooling: Spec) -> None:
    p = (pooling.get("args") or {}).get("p")
    if pooling.get("name") == "gem" and p is not None and (not is_number(p) or p <= 0):
        raise ConfigError(f"model.pooling.args.p: GeM's power must be a positive number "
                          f"(1 is average pooling, 3 the usual start), got {p!r}")  # fmt: skip


# Optimizer arguments that are numbers (betas: a list of them). A quoted "1e-4" would pass
# the types and fail inside the optimizer at the first step.
NUMERIC_OPTIMIZER_ARGS = ("lr", "weight_decay", "momentum", "eps", "alpha", "dampening",
                          "lr_decay", "layer_decay", "rho", "initial_accumulator_value",
                          "betas")  # fmt: skip


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numeric_text(x: Any) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return isinstance(x, str)


def _check_numeric_args(args: dict[str, Any], key: str) -> None:
    for name in NUMERIC_OPTIMIZER_ARGS:
        if name not in args:
            continue
        value = args[name]
        ok = (isinstance(value, (list, tuple)) and len(value) > 0
              and all(is_number(v) for v in value)) if name == "betas" else is_number(value)
        if not ok:
            hint = " (a quoted number: write it without quotes)" if _numeric_text(value) else ""
            want = "a list of numbers" if name == "betas" else "a number"
            raise ConfigError(f"{key}.{name}: expected {want}, got {value!r}{hint}")
