"""Losses and miners by name: cross-entropy plus everything pytorch-metric-learning ships.

A pml loss is composed of a distance, a reducer and a miner; nested components in `args`
(e.g. `distance: {name: CosineSimilarity}`) are built from pml's own modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers
from torch import nn

from mltrain.errors import ConfigError
from mltrain.registry import Registry

LOSSES = Registry("loss")
MINERS = Registry("miner")
_NESTED = {
    "distance": Registry("distance"),
    "reducer": Registry("reducer"),
    "embedding_regularizer": Registry("regularizer"),
    "weight_regularizer": Registry("regularizer"),
}


def _register_module(registry: Registry, module: Any, base: type) -> None:
    for name, obj in vars(module).items():
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base:
            if not name.startswith("Base") and name not in registry:
                registry.register(name, obj)


_register_module(LOSSES, losses, losses.BaseMetricLossFunction)
_register_module(MINERS, miners, miners.BaseMiner)
_register_module(_NESTED["distance"], distances, distances.BaseDistance)
_register_module(_NESTED["reducer"], reducers, reducers.BaseReducer)
for _key in ("embedding_regularizer", "weight_regularizer"):
    _register_module(_NESTED[_key], regularizers, regularizers.BaseRegularizer)
LOSSES.register("cross_entropy", nn.CrossEntropyLoss)
# A wrapper: the loss it wraps (and its miner) sees the batch against a memory of recent
# batches' embeddings, so a CPU batch of 32 gets thousands of negatives.
LOSSES.register("CrossBatchMemory", losses.CrossBatchMemory)
_NESTED["loss"] = LOSSES
_NESTED["miner"] = MINERS


def _args(spec: dict, signature_of: Any, fill: dict[str, Any]) -> dict[str, Any]:
    """The spec's args with nested components built and `fill` values the class accepts."""
    args = dict(spec.get("args") or {})
    for key, value in args.items():
        if key in _NESTED and isinstance(value, (dict, str)):
            nested = {"name": value} if isinstance(value, str) else value
            args[key] = _NESTED[key].build(nested)
    params = inspect.signature(signature_of).parameters
    for key, value in fill.items():
        if key in params and key not in args:
            args[key] = value
    return args


def _construct(key: str, registry: Registry, spec: dict, fill: dict[str, Any]) -> nn.Module:
    """The loss or miner of `spec`; a bad argument names its config key and what it takes."""
    cls = registry.get(spec["name"])
    try:
        return cls(**_args(spec, cls, fill))
    except (TypeError, ValueError) as e:
        offer = registry.takes(spec["name"], fill)
        raise ConfigError(f"{key}.args: {spec['name']}: {e}{offer}") from None


HYBRID_LABEL_SMOOTHING = 0.1


@dataclass
class Criterion:
    """A loss with its optional miner; `uses_logits` marks classification losses on the head.

    `hybrid` (BNNeck) adds label-smoothed cross-entropy on the head's logits to the metric loss.
    `logits` maps embeddings to classifier scores (the model's `logits`).
    """

    loss: nn.Module
    miner: nn.Module | None
    uses_logits: bool
    hybrid: bool = False

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, logits: Any | None):
        if self.uses_logits:
            return self.loss(logits(embeddings), labels)
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        out = self.loss(embeddings, labels, tuples)
        if self.hybrid:
            ce = F.cross_entropy(
                logits(embeddings).float(), labels, label_smoothing=HYBRID_LABEL_SMOOTHING
            )
            out = out + ce
        return out


def build_criterion(
    loss_spec: dict,
    miner_spec: dict | None,
    num_classes: int,
    embedding_dim: int,
    has_head: bool,
    hybrid: bool = False,
) -> Criterion:
    """Losses that own weights (ArcFace, NormalizedSoftmax, ...) get their sizes filled in;
    `hybrid` (model.bnneck) adds cross-entropy on the head to a metric loss."""
    name = loss_spec["name"]
    LOSSES.get(name)  # an unknown name is the first thing said
    uses_logits = name == "cross_entropy"
    if uses_logits and not has_head:
        raise ConfigError("train.loss: cross_entropy needs a classifier: set model.head: true")
    if has_head and not uses_logits and not hybrid:
        raise ConfigError(
            f"model.head: true is only for train.loss cross_entropy, not {name} (or add "
            "model.bnneck: true for a metric + classification hybrid)"
        )
    if uses_logits and miner_spec:
        raise ConfigError("train.miner: a miner has no effect with cross_entropy; remove it")
    if name == "CrossBatchMemory" and miner_spec:
        raise ConfigError(
            "train.miner: CrossBatchMemory mines batch against memory itself; move the miner "
            "into train.loss.args.miner"
        )
    fill = {"num_classes": num_classes, "embedding_size": embedding_dim}
    loss = _construct("train.loss", LOSSES, loss_spec, fill)
    miner = _construct("train.miner", MINERS, miner_spec, {}) if miner_spec else None
    criterion = Criterion(loss=loss, miner=miner, uses_logits=uses_logits, hybrid=hybrid)
    check_choices(loss_spec, "train.loss")
    if miner_spec:
        check_choices(miner_spec, "train.miner")
    dry_run(criterion, num_classes, embedding_dim)
    return criterion


# String arguments pml compares against without checking (an unknown value silently means
# "all"): checked here instead.
_CHOICES = {
    "type_of_triplets": ("all", "hard", "semihard", "easy"),
    "pos_strategy": ("all", "hard", "semihard", "easy"),
    "neg_strategy": ("all", "hard", "semihard", "easy"),
}


def check_choices(spec: dict, key: str) -> None:
    for arg, choices in _CHOICES.items():
        value = (spec.get("args") or {}).get(arg)
        if value is not None and value not in choices:
            raise ConfigError(f"{key}.args.{arg} must be one of {', '.join(choices)}, "
                              f"got {value!r}")  # fmt: skip


def dry_run(criterion: Criterion, num_classes: int, embedding_dim: int) -> None:
    """Score a tiny random batch with copies of the loss and miner, so that an argument of
    the wrong type (a margin of "abc") is a config error now, not a library traceback at the
    first step after the data was cached."""
    import copy

    c = copy.deepcopy(criterion)  # CrossBatchMemory would otherwise keep the random batch
    labels = torch.arange(8) % min(4, max(num_classes, 1))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the run's seeds stay intact
            emb = F.normalize(torch.randn(8, embedding_dim))
            c(emb, labels, nn.Linear(embedding_dim, max(num_classes, 1)))
    except Exception as e:  # noqa: BLE001 - whatever the library raises, name the config keys
        where = "train.loss.args" if c.miner is None else "train.loss.args / train.miner.args"
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: the loss cannot score a batch with these arguments "
                          f"({type(e).__name__}: {detail[:200]}); check their values and types "
                          "against the pytorch-metric-learning docs") from None  # fmt: skip
