"""timm backbone + pooling + optional neck and head; frozen stages on any timm family."""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mltrain.errors import CheckpointError, ConfigError
from mltrain.model.pooling import POOLINGS, GeM, Pooling, trunk_layout  # noqa: F401 - GeM re-exported
from mltrain.model.stages import StagePlan, stage_plan
from mltrain.model.weights import (  # noqa: F401 - re-exported: callers import them from here
    OFFLINE_WEIGHTS,
    check_backbone_name,
    check_patch_size,
    check_pretrained,
    create_backbone,
)
from mltrain.model.whitening import Whitening

_BN = nn.modules.batchnorm._BatchNorm


def trunk_stages(trunk: nn.Module) -> list[nn.Module] | None:
    """The trunk as a sequence of stages whose composition is `forward_features`, from timm's
    metadata (see `mltrain.model.stages`); None when no split is known for the family."""
    plan = stage_plan(trunk)
    return None if plan is None else plan.stages


_NOTED: set[str] = set()


def _resolve_frozen(
    trunk: nn.Module, plan: StagePlan | None, frozen: int, trainable: int | None
) -> int:
    """How many stages stay frozen: `frozen` as given (an error where it cannot apply), or
    what keeps the top `trainable` feature levels training (the whole trunk trains, with a
    note, where the family has no known split)."""
    family = type(trunk).__name__
    if trainable is not None:
        if plan is None:
            if family not in _NOTED:
                _NOTED.add(family)
                print(f"note: model.trainable_stages: no stage split is known for {family}; the "
                      "whole trunk trains (train.freeze_backbone_epochs can freeze it a while)",
                      file=sys.stderr)  # fmt: skip
            return 0
        return plan.frozen_for(trainable)
    if frozen and plan is None:
        raise ConfigError(
            f"model.frozen_stages: stage splitting is not known for {family}; "
            "use train.freeze_backbone_epochs instead", key="model.frozen_stages"
        )
    if plan is not None and frozen >= len(plan.stages):
        raise ConfigError(
            f"model.frozen_stages: {frozen} >= {len(plan.stages)} stages of {family}; use "
            f"model.trainable_stages (1 to {len(plan.level_ends)}: the top feature levels train)",
            key="model.frozen_stages",
        )
    return frozen


class EmbeddingModel(nn.Module):
    """trunk -> pooling -> optional linear neck -> (optional linear head for classification).

    `forward` returns the raw embedding; `embed` the retrieval embedding (L2-normalised when
    configured). Stages `[0, frozen_stages)` stay frozen, in eval mode, for the whole run;
    `trainable_stages` (the top N feature levels train) sets that count on any family.
    """

    def __init__(
        self,
        trunk: nn.Module,
        pooling: nn.Module,
        embedding_dim: int | None = None,
        normalize: bool = True,
        num_classes: int = 0,
        frozen_stages: int = 0,
        freeze_bn: bool = False,
        bnneck: bool = False,
        trainable_stages: int | None = None,
        pooling_name: str = "pooling",
    ) -> None:
        super().__init__()
        self.freeze_bn = freeze_bn
        self.trunk = trunk
        self.pool = pooling
        plan = stage_plan(trunk) if frozen_stages or trainable_stages is not None else None
        if isinstance(pooling, Pooling):
            tokens, family = int(getattr(trunk, "num_prefix_tokens", 0)), type(trunk).__name__
            pooling.configure(trunk_layout(trunk), tokens, pooling_name, family)
        feat_dim = trunk.num_features * getattr(pooling, "cells", 1)
        self.neck = nn.Linear(feat_dim, embedding_dim) if embedding_dim else nn.Identity()
        self.embedding_dim = embedding_dim or feat_dim
        self.trained_dim = self.embedding_dim  # before any whitening
        # BNNeck (re-identification baselines): the metric loss sees the feature, the classifier
        # and retrieval its batch-normalised form, so the two objectives do not pull one space
        self.bnneck = nn.BatchNorm1d(self.embedding_dim) if bnneck else None
        if self.bnneck is not None:
            self.bnneck.bias.requires_grad_(False)
        head_bias = not bnneck
        self.head = (
            nn.Linear(self.embedding_dim, num_classes, bias=head_bias) if num_classes else None
        )
        self.normalize = normalize
        frozen_stages = _resolve_frozen(trunk, plan, frozen_stages, trainable_stages)
        stages = plan.stages if plan is not None and frozen_stages else None
        self._stages = stages  # plain list: the modules are registered through `trunk`
        self.frozen_stages = frozen_stages
        for stage in (stages or [])[:frozen_stages]:
            stage.requires_grad_(False)

        self.trunk_frozen = False
        self.whiten: Whitening | None = None  # fitted after training (`train.whiten`)

    def set_whitening(self, layer: Whitening | None) -> None:
        """Attach (or remove) a fitted whitening: `embed` then returns its output, of
        `layer`'s dimensions, so every path that embeds applies it."""
        self.whiten = layer
        self.embedding_dim = layer.matrix.shape[1] if layer is not None else self.trained_dim

    def restage(self) -> None:
        """Rebuild the stage list from the trunk (after its modules were replaced)."""
        if self._stages is not None:
            plan = stage_plan(self.trunk)
            self._stages = None if plan is None else plan.stages

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The trunk's timm parameter groups (stem, blocks, head) under `trunk.`, for layer-wise
        learning-rate decay; pooling, neck and head match none and so train at the full rate."""
        inner = self.trunk.group_matcher(coarse) if hasattr(self.trunk, "group_matcher") else {}

        def under_trunk(pattern: str) -> str:
            return rf"^trunk\.(?:{pattern.lstrip('^')})"

        return {
            name: under_trunk(p) if isinstance(p, str) else [(under_trunk(q), o) for q, o in p]
            for name, p in inner.items()
        }

    def set_trunk_frozen(self, frozen: bool) -> None:
        """Freeze the whole trunk (the first `freeze_backbone_epochs`); the permanently frozen
        prefix stays frozen either way. Frozen layers get no gradients, so no backward runs
        through them."""
        self.trunk_frozen = frozen
        stages = self._stages or [self.trunk]
        for stage in stages[self.frozen_stages :]:
            stage.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        frozen = (self._stages or [])[: self.frozen_stages]
        if self.trunk_frozen:
            frozen = [self.trunk]
        for stage in frozen:
            stage.eval()  # frozen BatchNorm statistics stay the pretrained ones
        if self.freeze_bn:  # the trunk's: a BNNeck has no pretrained statistics to keep
            for m in self.trunk.modules():
                if isinstance(m, _BN):
                    m.eval()
        return self

    def trainable_batchnorm(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """BatchNorm layers of the stages that train (the whole trunk when it has no stages)."""
        parts = [self.trunk] if self._stages is None else self._stages[self.frozen_stages :]
        return [m for part in parts for m in part.modules() if isinstance(m, _BN)]

    def bn_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the running statistics of `trainable_batchnorm`."""
        return [(m.running_mean.clone(), m.running_var.clone()) for m in self.trainable_batchnorm()]

    def load_bn_stats(self, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for m, (mean, var) in zip(self.trainable_batchnorm(), stats, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)

    def keep_bn_stats(self) -> None:
        """Training normalises each batch by its own statistics as usual, but the running
        statistics inference uses stay as they are (momentum 0)."""
        for m in self.trainable_batchnorm():
            m.momentum = 0.0

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the frozen stages (what `cache_frozen` stores)."""
        for stage in self._stages[: self.frozen_stages]:
            x = stage(x)
        return x

    def features(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        if self._stages is None:
            return self.trunk.forward_features(x)
        start = 0
        if from_prefix:
            start = self.frozen_stages
        elif self.frozen_stages:
            with torch.no_grad():
                x = self.prefix(x)
            start = self.frozen_stages
        for stage in self._stages[start:]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        return self.neck(self.pool(self.features(x, from_prefix)))

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Classifier scores of embeddings from `forward` (through the BNNeck when there is one)."""
        return self.head(self.bnneck(emb) if self.bnneck is not None else emb)

    def embed(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        emb = self.forward(x, from_prefix)
        if self.bnneck is not None:
            emb = self.bnneck(emb)
        emb = emb.float()
        emb = F.normalize(emb, dim=1) if self.normalize else emb
        return emb if self.whiten is None else self.whiten(emb)


def build_model(model_cfg: Any, num_classes: int = 0, whitening: tuple[int, int] | None = None
                ) -> EmbeddingModel:  # fmt: skip
    """Build from a `ModelConfig`; `num_classes` sizes the head when `head` is on;
    `whitening` (input, output dimensions) adds an empty whitening layer for saved weights."""
    trunk = create_backbone(model_cfg.backbone, model_cfg.pretrained, num_classes=0,
                            image_size=model_cfg.image_size)  # fmt: skip
    trunk.reset_classifier(0, global_pool="")
    model = EmbeddingModel(
        trunk,
        POOLINGS.build(model_cfg.pooling),
        embedding_dim=model_cfg.embedding_dim,
        normalize=model_cfg.normalize,
        num_classes=num_classes if model_cfg.head else 0,
        frozen_stages=model_cfg.frozen_stages or 0,
        freeze_bn=model_cfg.freeze_bn,
        bnneck=model_cfg.bnneck,
        trainable_stages=getattr(model_cfg, "trainable_stages", None),
        pooling_name=str(model_cfg.pooling.get("name")),
    )
    if whitening is not None:
        model.set_whitening(Whitening(*whitening))
    return model


def whitening_shape(state: Mapping[str, Any]) -> tuple[int, int] | None:
    """The shape of the fitted whitening saved weights carry, if any (see `set_whitening`)."""
    matrix = state.get("whiten.matrix")
    return tuple(matrix.shape) if isinstance(matrix, torch.Tensor) and matrix.ndim == 2 else None


def check_state_fits(
    model_cfg: Any, num_classes: int, state: Mapping[str, Any], source: str
) -> None:
    """Compare `state`'s keys and shapes with the model `model_cfg` describes, built on the
    meta device (no memory, no weights), so that a config naming a huge backbone beside a
    small weights file is refused before anything large is allocated. Raises
    `CheckpointError` naming `source`, what is missing or unexpected, and shapes that differ.
    """
    meta_cfg = copy.copy(model_cfg)
    meta_cfg.pretrained = False
    with torch.device("meta"):
        meta_model = build_model(meta_cfg, num_classes, whitening_shape(state))
    own = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {own[k]}" for k in sorted(set(own) & set(state))
              if k not in bad and tuple(state[k].shape) != own[k]]  # fmt: skip
    if bad or missing or unexpected or shapes:
        parts = [f"{what} {items[:3]}{' ...' if len(items) > 3 else ''} ({len(items)})"
                 for what, items in (("not tensors:", bad), ("missing:", missing),
                                     ("unexpected:", unexpected), ("shapes differ:", shapes))
                 if items]  # fmt: skip
        raise CheckpointError(
            f"{source}: the weights do not fit the model its config describes "
            f"({model_cfg.backbone}): {'; '.join(parts)}"
        )


def model_from_state(
    model_cfg: Any,
    num_classes: int,
    state: Mapping[str, Any],
    source: str,
    described_by: str = "its config",
) -> EmbeddingModel:
    """The model `model_cfg` describes, holding `state`'s weights, with nothing downloaded.

    Evaluation, export and search rebuild a saved model this way, so they accept and refuse
    the same weights. Keys and shapes are compared on the meta device first (see
    `check_state_fits`): a config naming a huge backbone is refused before it is allocated.
    Raises `CheckpointError` naming `source`.
    """
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.pretrained = False  # the state carries the weights
    check_state_fits(model_cfg, num_classes, state, source)
    model = build_model(model_cfg, num_classes=num_classes, whitening=whitening_shape(state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source}: weights do not fit the model {described_by} describes: {str(e)[:500]}"
        ) from None
    return model


def data_config(model: EmbeddingModel, model_cfg: Any = None) -> dict[str, Any]:
    """Preprocessing the backbone was trained with (timm `resolve_data_config`), with the
    config's `image_size`, `crop_pct` and `crop_mode` where set (`crop_mode: auto`, which
    training resolves on its validation images, is the backbone's own until then)."""
    args: dict[str, Any] = {}
    if model_cfg is not None:
        if model_cfg.image_size:
            args["input_size"] = (3, model_cfg.image_size, model_cfg.image_size)
        for key in ("crop_pct", "crop_mode"):
            if getattr(model_cfg, key) not in (None, "auto"):
                args[key] = getattr(model_cfg, key)
    return timm.data.resolve_data_config(args, model=model.trunk)


def check_pooling_fits(model_cfg: Any) -> None:
    """A grid pooling needs a last feature map at least its size: checked before any data is
    read, on the meta device (shapes only: nothing is allocated or computed). A family the
    meta device cannot run is left to its first forward, which says the same."""
    if getattr(POOLINGS.build(model_cfg.pooling), "cells", 1) == 1:
        return
    try:
        with torch.device("meta"):
            model = build_model(dataclasses.replace(model_cfg, pretrained=False)).eval()
            size = data_config(model, model_cfg)["input_size"]
            model.pool(model.trunk.forward_features(torch.empty(1, *size)))
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - only the early check is lost
        return
