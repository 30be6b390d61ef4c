"""What the steps and the held-out evaluation read: image loaders, or, when the trunk's bottom
stays frozen (`train.cache_frozen`), that frozen prefix's outputs computed once per image and
augmented view and kept in the shared disk cache (`mltrain.train.prefix_cache`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from mltrain.config import Config
from mltrain.data.dataset import make_loader
from mltrain.data.pipeline import CachedFeatures, RunData, eval_loader, train_dataset, train_loader
from mltrain.model.network import EmbeddingModel
from mltrain.runtime import InferSpec
from mltrain.train.heldout import inference_model
from mltrain.train.loop import compute_prefix
from mltrain.train.prefix_cache import cached, weights_identity


class Loaders:
    """The training sets (one per cached view, else the image dataset) and the held-out
    batches. `from_prefix`: batches hold cached prefix features, not images."""

    def __init__(
        self, cfg: Config, data: RunData, model: EmbeddingModel, dcfg: dict[str, Any],
        infer_spec: InferSpec,
    ) -> None:  # fmt: skip
        self.cfg, self.data, self.model, self.dcfg = cfg, data, model, dcfg
        self.infer_spec = infer_spec
        self.from_prefix = from_prefix(cfg, model)
        if not self.from_prefix:
            self.train_sets = [train_dataset(cfg, data, dcfg)]
        else:
            self.train_sets = [self._cache_view(v) for v in range(cfg.train.cache_views)]
        self.eval_batches = heldout_batches(cfg, data, model, dcfg, infer_spec)

    def epoch_loader(self, epoch: int) -> DataLoader:
        """The training batches of `epoch`: the views take turns, the order follows the seed."""
        dataset = self.train_sets[epoch % len(self.train_sets)]
        return train_loader(self.cfg, self.data, dataset, seed=self.cfg.seed * 1000 + epoch)

    def _cache_view(self, view: int) -> CachedFeatures:
        """One augmented pass over the training images through the frozen prefix."""
        seed = self.cfg.seed * 1000 + 500 + view
        # Augmentation streams follow the worker seeds, so the worker count stays the loader
        # default (at most 4) rather than one per core: the same views on any machine of 4+.
        loader = make_loader(
            train_dataset(self.cfg, self.data, self.dcfg),
            self.cfg.eval.batch_size,
            num_workers=self.cfg.data.num_workers,
            seed=seed,
        )
        desc = f"caching train prefix (view {view + 1})"
        return CachedFeatures(*prefix_features(self.cfg, self.model, self.dcfg, self.infer_spec,
                                               "train", loader, desc, seed))  # fmt: skip


def from_prefix(cfg: Config, model: EmbeddingModel) -> bool:
    """Whether steps and held-out evaluation read cached frozen-prefix features (a family with
    no stage split trains whole, `model.trainable_stages`: nothing to cache)."""
    return cfg.train.cache_frozen and model.frozen_stages > 0


def heldout_batches(cfg: Config, data: RunData, model: EmbeddingModel, dcfg: dict[str, Any],
                    spec: InferSpec) -> Iterable:  # fmt: skip
    """The held-out (validation) batches under the preprocessing `dcfg`: images, or, where
    `from_prefix`, their frozen-prefix features through the inference model, from the disk
    cache (so a second look at the same images under the same `dcfg` costs nothing)."""
    rows = data.split.selection
    images = eval_loader(cfg, data.paths(rows), data.folder.labels[rows], dcfg)
    if not from_prefix(cfg, model):
        return images
    folded = inference_model(cfg, model, tuple(dcfg["input_size"]), spec.device)
    desc = f"caching {data.split.selection_side} prefix"
    feats = prefix_features(cfg, model, dcfg, spec, "heldout", images, desc, through=folded)
    return DataLoader(CachedFeatures(*feats), batch_size=cfg.eval.batch_size)


def prefix_features(
    cfg: Config, model: EmbeddingModel, dcfg: dict[str, Any], spec: InferSpec, name: str,
    loader: DataLoader, desc: str, seed: int | None = None, through: EmbeddingModel | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Frozen-prefix outputs of a loader's images (through `through`, default the training
    `model`), via the shared disk cache."""
    net = model if through is None else through
    parts = {
        "backbone": cfg.model.backbone,
        "weights": weights_identity(cfg.model.pretrained),
        "frozen_stages": model.frozen_stages,  # resolved from trainable_stages too
        "data_config": dcfg,
        "augment": cfg.data.augment if name == "train" else None,
        "seed": seed,
        "amp": str(spec.amp),
        "paths": [str(p) for p in loader.dataset.paths],
        "labels": loader.dataset.labels.tolist(),
        "workers": loader.num_workers,
        # 2: chunked forward, in the workers on CPU (mltrain.inference.batching).
        # eval.cpu_chunk and where the model runs move bf16 results by rounding only, so they
        # are not keyed.
        "version": 2,
    }
    if getattr(loader.dataset, "turns", None):  # data.class_augment (keyed only where used)
        parts["turns"] = loader.dataset.turns
    if name == "heldout":  # the inference model: BatchNorm folded or not (eval.fold_bn)
        parts["fold_bn"] = net is not model
    return cached(parts, lambda: compute_prefix(net, loader, spec, desc))
