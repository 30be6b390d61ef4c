"""The config's shape: the dataclasses every YAML key is checked against, with the values a
key may take (`CHOICES`) and the numeric ranges (`RANGES`) kept beside the fields they govern,
so adding a key means editing one file. Loading lives in `mltrain.config`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    # class_disjoint: what goes to a side whole. class | parent (the folder above each class,
    # Omniglot's alphabet: test classes from parents never trained on)
    split_by: str = "class"
    augment: list[Spec] = field(default_factory=list)  # albumentations transforms by name
    # Turns of every training image that make new classes (CLASS_TURNS): a rotated or mirrored
    # character is another character (mltrain.data.class_augment)
    class_augment: list[str] = field(default_factory=list)
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
    # center | squash | border | auto (training picks center or squash on the validation images)
    crop_mode: str | None = None


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
    # After the last epoch: fit a supervised whitening on the training side's embeddings and
    # keep it in best.pt when it beats best.pt on train.best_metric (auto), or never (off)
    whiten: str = "auto"
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
    backend: str = "auto"  # what embeds with frozen weights: auto | torch | openvino
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
    # auto (hnsw below 500,000 rows, else ivf_hnsw) | flat | hnsw | ivf_flat | ivf_hnsw |
    # ivf_pq (Faiss) | milvus
    index: str = "auto"
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


CLASS_TURNS = ("rotate90", "rotate180", "rotate270", "mirror")  # data.class_augment's names
CHOICES = {
    "data.split": ("per_class", "class_disjoint", "none"),
    "data.split_by": ("class", "parent"),
    "data.bad_images": ("error", "skip"),
    "eval.one_shot_within": ("auto", "parent", "none"),
    "model.bn_stats": ("auto", "update", "pretrained"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.whiten": ("auto", "off"),
    "eval.amp": ("auto", "bf16", "fp16", "off"),
    "eval.metric": ("cosine", "l2"),
    "eval.gallery": ("heldout", "train"),
    "eval.backend": ("auto", "torch", "openvino"),
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
# workers are bounded by this machine (`max_loader_workers` in `mltrain.config_checks`).
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


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
