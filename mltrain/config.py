"""Typed configs: strict YAML loading and `--set key=value` overrides.

Every key is checked against the dataclasses below: an unknown key or a wrong type is a
`ConfigError` naming the key and the file, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

import yaml

from mltrain.errors import ConfigError

Spec = dict[str, Any]  # a component written `{name: ..., args: {...}}`


def spec(name: str, **args: Any) -> Spec:
    return {"name": name, "args": args}


@dataclass
class DataConfig:
    root: str = "../shared/data/101_ObjectCategories.tar.gz"  # folder, archive or labels .csv
    # Left out where present; a name that matches no class is a warning, not an error.
    exclude_classes: list[str] = field(default_factory=lambda: ["BACKGROUND_Google"])
    class_depth: int | str = "auto"  # auto: the deepest folders holding images; N: depth N
    split: str = "per_class"  # per_class | class_disjoint | none
    train_fraction: float = 0.5
    # class_disjoint: share of all classes, taken from the non-test side, that picks best.pt
    # (validation classes); the test classes stay those of train_fraction alone. auto: 0.15
    # where that makes 3 or more validation classes, else 0 (two-way: train / held-out)
    val_fraction: float | str = "auto"
    augment: list[Spec] = field(default_factory=list)  # albumentations transforms by name
    bad_images: str = "error"  # error | skip
    check_images: bool = True
    num_workers: int | None = None  # None: min(cores, 4)


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool | str = "offline"  # true (hub) | false | offline | path to weights
    pooling: Spec = field(default_factory=lambda: spec("avg"))
    embedding_dim: int | None = None  # a linear projection (neck) when set
    normalize: bool = True  # L2-normalise embeddings
    head: bool = False  # linear classification head (classification mode)
    bnneck: bool = False  # with head and a metric loss: BNNeck hybrid (metric + cross-entropy)
    # Trunk stages kept frozen for the whole run, counted from the bottom in the family's own
    # stages (null or 0: none). A positive count excludes trainable_stages.
    frozen_stages: int | None = None
    # The top N feature levels of timm's feature_info train, the rest stay frozen: the same
    # on every family (CNNs: resolution stages, ViTs: blocks). Excludes frozen_stages.
    trainable_stages: int | None = None
    freeze_bn: bool = False  # BatchNorm statistics stay pretrained (eval mode) while training
    # Running statistics of the trainable trunk's BatchNorm, what inference normalises with:
    # update (follow the training batches) | pretrained (kept; training still normalises each
    # batch by its own statistics) | auto (each held-out evaluation keeps the better of the two)
    bn_stats: str = "auto"
    image_size: int | None = None  # None: the backbone's own data config
    # Eval geometry: resize to image_size / crop_pct, then crop (timm's data config keys);
    # None keeps the backbone's (0.875, center). 1.0 keeps whole objects in frame.
    crop_pct: float | None = None
    crop_mode: str | None = None  # center | squash | border


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    loss: Spec = field(default_factory=lambda: spec("ContrastiveLoss"))
    miner: Spec | None = None
    sampler: Spec = field(default_factory=lambda: spec("m_per_class", m=4))
    optimizer: Spec = field(default_factory=lambda: spec("adamw", lr=1e-4, weight_decay=1e-4))
    scheduler: Spec = field(default_factory=lambda: spec("cosine", warmup_epochs=0))
    loss_lr: float | None = None  # the loss's own parameters (proxies); None: the optimizer's lr
    layer_decay: float | None = None  # timm layer-wise lr decay: each earlier layer x this
    freeze_backbone_epochs: int = 0
    grad_clip: float | None = None
    grad_accum: int = 1
    amp: str = "auto"  # training steps: auto | bf16 | fp16 | off
    depthwise_fp32: bool = True  # under CPU bf16, train 5x5 depthwise convs in fp32 (faster)
    channels_last: bool = True
    cache_frozen: bool = False  # cache the frozen trunk prefix's outputs (needs frozen_stages)
    cache_views: int = 1  # augmented views cached per image when cache_frozen is on
    eval_every: int = 1
    # Held-out metrics of the untrained model at step 0 too: the curve's starting point, and a
    # note when training never beats it (fine-tuning can hurt unseen classes).
    eval_start: bool = True
    # Every N epochs (of those evaluated, and the last): held-out ROC AUC/EER, the PR curve,
    # the ROC and a query grid in TensorBoard; 0: never.
    figures_every: int = 1
    # held-out metric that picks best.pt: map_at_r does not saturate on small held-out sets as
    # precision_at_1 does; eer (lower is better) or roc_auc for verification
    best_metric: str = "map_at_r"
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalConfig:
    metric: str = "cosine"  # cosine | l2
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 64
    amp: str = "auto"  # inference (embeddings, prefix cache): auto | bf16 | fp16 | off
    fold_bn: bool = True  # embed with BatchNorm folded into the convolutions (same output)
    cpu_chunk: int = 8  # images per model call on CPU (small batches stay in cache); 0 = all
    model_in_workers: bool = True  # on CPU (Linux), loader workers decode and embed
    flip_tta: bool = False  # embed image and mirror, average: costs 2x embedding time
    gallery: str = "heldout"  # heldout (leave-one-out) | train
    pca_lengths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 100, 128, 256, 512])
    index_types: list[str] = field(default_factory=lambda: ["flat", "hnsw", "ivf_flat", "ivf_pq"])
    verification_pairs: int = 20000
    one_shot_ways: list[int] = field(default_factory=lambda: [5, 20])
    one_shot_episodes: int = 500
    # one-shot episodes drawn within one parent folder (alphabet/character: one alphabet):
    # auto (reported beside the plain figure where a parent holds enough classes) | parent | none
    one_shot_within: str = "auto"
    rerank: bool = True  # measure k-reciprocal and alpha-QE/DBA re-ranking on held-out rows
    tsne: bool = True
    tsne_max_points: int = 3000


@dataclass
class ExportConfig:
    index: str = "hnsw"  # flat | hnsw | ivf_flat | ivf_pq (Faiss) | milvus
    index_args: dict[str, Any] = field(default_factory=dict)
    pca_dim: int | None = None  # PCA length inside the index; None keeps the full length
    dtype: str = "float32"  # stored embeddings: float32 | float16
    k: int = 5
    shard_size: int = 1_000_000  # galleries with more rows are written as memory-mapped shards


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    output_dir: str = "experiments"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


AT_K = r"(?:precision|recall)_at_([1-9]\d*)"  # the metrics held-out retrieval names by k
BEST_METRICS = re.compile(rf"map_at_r|r_precision|mean_average_precision|{AT_K}|eer|roc_auc")
LOWER_IS_BETTER = ("eer",)


def best_metric_k(name: str) -> int | None:
    """The k of a precision_at_<k> / recall_at_<k> metric, else None."""
    match = re.fullmatch(AT_K, name)
    return int(match.group(1)) if match else None

CHOICES = {
    "data.split": ("per_class", "class_disjoint", "none"),
    "data.bad_images": ("error", "skip"),
    "eval.one_shot_within": ("auto", "parent", "none"),
    "model.bn_stats": ("auto", "update", "pretrained"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.device": ("auto", "cpu", "cuda"),
    "eval.amp": ("auto", "bf16", "fp16", "off"),
    "eval.metric": ("cosine", "l2"),
    "eval.gallery": ("heldout", "train"),
    "export.dtype": ("float32", "float16"),
}


class Bound(NamedTuple):
    """The closed range [low, high] a numeric key must lie in (None: no limit that side);
    `why` says what the limit protects or what the edge value means."""

    low: float | None
    high: float | None
    why: str = ""


# Numeric keys and their ranges: an out-of-range value would otherwise fail late, deep in a
# library (numpy's seed, OpenCV's resize, a negative array size) or mean something silently
# (image_size 0 read as the default). A key left null (optional) is not checked. Loader
# workers are bounded by this machine (`max_loader_workers`), see `_check_ranges`.
RANGES: dict[str, Bound] = {
    "seed": Bound(0, 2**32 - 1, "numpy's seed range"),
    # pixels a side: CNNs downsample 32x and ViTs cut 16 px patches; 4096 px images already
    # take GBs a batch
    "model.image_size": Bound(16, 4096, "pixels a side"),
    "model.embedding_dim": Bound(1, 65536),
    "model.frozen_stages": Bound(0, None),
    "train.epochs": Bound(1, 1_000_000),
    "train.batch_size": Bound(1, 65536),
    "train.max_steps": Bound(1, None),
    "train.grad_accum": Bound(1, 65536),
    "train.freeze_backbone_epochs": Bound(0, None),
    "train.cache_views": Bound(1, 1024),
    "train.eval_every": Bound(1, None),
    "train.figures_every": Bound(0, None, "0 = never"),
    "train.max_bad_steps": Bound(1, None),
    "eval.batch_size": Bound(1, 65536),
    "eval.cpu_chunk": Bound(0, 65536, "0 = whole batches"),
    "eval.verification_pairs": Bound(0, 10_000_000, "0 = no verification"),
    "eval.one_shot_episodes": Bound(1, 1_000_000),
    "eval.tsne_max_points": Bound(10, 100_000, "t-SNE time grows faster than the points"),
    "export.k": Bound(1, 1000),
    "export.pca_dim": Bound(1, 65536),
    "export.shard_size": Bound(1, None),
}

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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            hint = f"; write one item as a list: [{value}]" if isinstance(value, (str, int)) else ""
            raise ConfigError(f"{key}: expected a list, got {value!r}{hint}")
        (item,) = typing.get_args(tp)
        if item is str:  # `exclude_classes: [10]`: YAML reads a class named 10 as a number
            value = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                     for v in value]  # fmt: skip
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and key.endswith("_args"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is dict or tp is dict:
        return _check_spec(value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is Any or isinstance(value, tp):
        return value
    hint = f"; quote it ('{value}') to use it as text" if tp is str and _is_number(value) else ""
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")


def _check_spec(value: Any, key: str) -> Spec:
    if isinstance(value, str):  # shorthand: `loss: TripletMarginLoss`
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{key}: expected {{name: ..., args: {{...}}}}, got {value!r}")
    unknown = set(value) - {"name", "args"}
    if unknown:
        raise ConfigError(f"{key}: unknown keys {sorted(unknown)}; a component has name and args")
    args = value.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{key}.args: expected a mapping, got {args!r}")
    return {"name": value["name"], "args": dict(args)}


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key '{where}{unknown[0]}'; valid keys here: {', '.join(names)}")
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**values)


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
    if cfg.model.crop_mode not in (None, "center", "squash", "border"):
        raise ConfigError(
            f"model.crop_mode: {cfg.model.crop_mode!r} is not one of center, squash, border"
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
    return cfg


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
    if pooling.get("name") == "gem" and p is not None and (not _is_number(p) or p <= 0):
        raise ConfigError(f"model.pooling.args.p: GeM's power must be a positive number "
                          f"(1 is average pooling, 3 the usual start), got {p!r}")  # fmt: skip


# Optimizer arguments that are numbers (betas: a list of them). A quoted "1e-4" would pass
# the types and fail inside the optimizer at the first step.
NUMERIC_OPTIMIZER_ARGS = ("lr", "weight_decay", "momentum", "eps", "alpha", "dampening",
                          "lr_decay", "layer_decay", "rho", "initial_accumulator_value",
                          "betas")  # fmt: skip


def _is_number(x: Any) -> bool:
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
              and all(_is_number(v) for v in value)) if name == "betas" else _is_number(value)
        if not ok:
            hint = " (a quoted number: write it without quotes)" if _numeric_text(value) else ""
            want = "a list of numbers" if name == "betas" else "a number"
            raise ConfigError(f"{key}.{name}: expected {want}, got {value!r}{hint}")


def from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build a validated `Config`; errors name `source` (the file) and the key."""
    try:
        return validate(_from_dict(Config, data or {}, ""))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `1e-4` is a float and only true/false are booleans
    (YAML 1.1 would read `amp: off` as False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)



def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """A mapping that names a key twice is refused: YAML would keep the last silently."""
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            repeated = key in seen
        except TypeError:  # a list or mapping as a key: PyYAML itself refuses it below
            continue
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one section", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class TooDeep(yaml.YAMLError):
    """YAML nested deeper than Python's recursion allows: PyYAML builds nodes recursively, so
    20,000 `[` would be a RecursionError; no config comes close."""

    def __str__(self) -> str:
        return "nested too deeply (a config has a few levels of sections)"


def _yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise TooDeep() from None


def clipped(text: str, limit: int = 100) -> str:
    """`text` as messages echo it: a value pasted by mistake (a million characters) is cut,
    with its length said, so that the error stays one readable line."""
    return text if len(text) <= limit else f"{text[: limit - 30]}... ({len(text):,} characters)"


def override_key(text: str) -> str:
    """The dotted key of a `--set key=value` override, as written."""
    return text.split("=", 1)[0].strip()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so `1e-3`, `true`, `[1, 2]` work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=3")
    key, raw = override_key(text), text.split("=", 1)[1]
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        if raw.strip()[:1] in "{[":  # meant as a mapping or list: a plain string would mislead
            problem = str(getattr(e, "problem", "") or e).splitlines()[0]
            raise ConfigError(
                f"--set {key}: {clipped(raw.strip())!r} is not valid YAML ({problem}); check its "
                "brackets and quotes"
            ) from None
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{k}' is not a section")
        node[keys[-1]] = value
    return data


# What only training reads: commands that embed with a trained or pretrained model (evaluate,
# export, compare) refuse these in --set instead of silently ignoring them.
TRAINING_ONLY = ("train", "data.augment", "model.frozen_stages", "model.trainable_stages",
                 "model.freeze_bn", "model.bn_stats")
READ_BY_INFERENCE = ("train.device", "train.channels_last")
INFERENCE_TWIN = {"train.amp": "eval.amp", "train.batch_size": "eval.batch_size"}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _set_keys(item: str) -> list[str]:
    """The dotted keys one `--set` writes: its own, or each leaf of a mapping it sets
    (`--set 'data={augment: []}'` writes data.augment)."""
    path, value = parse_override(item)

    def leaves(prefix: str, v: Any) -> list[str]:
        if not isinstance(v, dict) or not v:
            return [prefix]
        return [k for name, sub in v.items() for k in leaves(f"{prefix}.{name}", sub)]

    return leaves(".".join(path), value)


def _training_only(key: str) -> bool:
    return key not in READ_BY_INFERENCE and any(_under(key, k) for k in TRAINING_ONLY)


def is_training_only(key: str) -> bool:
    """Whether only training reads the dotted `key` (an embedding never depends on it)."""
    return _training_only(key)


def check_inference_overrides(overrides: list[str], command: str) -> None:
    """A `--set` that `command` would ignore is a one-line error, naming the key it meant."""
    for item in overrides:
        ignored = [k for k in _set_keys(item) if _training_only(k)]
        if not ignored:
            continue
        key = override_key(item) if _training_only(override_key(item)) else ignored[0]
        twin = INFERENCE_TWIN.get(key)
        where = f"set {twin} instead" if twin else "it takes effect in train.py"
        raise ConfigError(f"--set {key}: only training reads it, so {command} would ignore it; "
                          f"{where}")


MAX_CONFIG_BYTES = 2**20  # a config is a few KB; more is another file given by mistake


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise ConfigError(
            f"--config {path} is a folder; pass one YAML file in it"
            + (f", e.g. {path / found[0]} (it holds {', '.join(found)})" if found else "")
        )
    if not path.exists():
        guesses = [q for q in (Path("configs") / f"{path.stem}.yaml", path.with_suffix(".yaml"))
                   if q != path and q.is_file()]  # fmt: skip
        hint = f"did you mean {guesses[0]}?" if guesses else "see configs/ for examples"
        raise ConfigError(f"config file {path} does not exist; {hint}")
    if not path.is_file():  # a FIFO or device would hang the read
        raise ConfigError(f"config file {path} is not a regular file; pass a YAML file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        most = MAX_CONFIG_BYTES // 2**20
        raise ConfigError(f"config file {path} holds {size:,} bytes, more than a config ({most} "
                          "MiB at most); pass a YAML config")  # fmt: skip
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start:,} is "
                          f"{e.object[e.start]:#04x}); pass a YAML config") from None  # fmt: skip
    try:
        data = _yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `--set` overrides.

    The run name defaults to the file's stem so runs land in `experiments/<config name>/`.
    """
    data = read_yaml(path) if path else {}
    if path and "name" not in data:
        data["name"] = Path(path).stem
    source = str(path) if path else "defaults"
    if not overrides:
        return from_dict(data, source)
    # overrides apply on top of the filled-in defaults, so `--set train.optimizer.args.lr=..`
    # works when the file leaves the optimizer out
    data = apply_overrides(to_dict(from_dict(data, source)), overrides)
    return from_dict(data, f"{source} with --set {' '.join(map(clipped, overrides))}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
