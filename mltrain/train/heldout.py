"""Held-out evaluation during training: the retrieval figures that pick best.pt, the choice of
BatchNorm statistics (`model.bn_stats: auto`), and, on figure epochs, ROC AUC and EER with
their PR curve, ROC and query grid in TensorBoard."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from mltrain.config import Config, ModelConfig
from mltrain.data.pipeline import RunData
from mltrain.errors import DataError
from mltrain.evaluation import contact_sheet, figures, tensorboard
from mltrain.evaluation.metrics import retrieval_metrics
from mltrain.evaluation.plan import usable_ks
from mltrain.evaluation.tensorboard import HELDOUT
from mltrain.evaluation.verification import verification_metrics
from mltrain.inference.batching import extract_embeddings
from mltrain.model.fusion import fold_batchnorm
from mltrain.model.network import EmbeddingModel
from mltrain.runtime import InferSpec
from mltrain.train.checkpoints import better

Embedded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # emb, labels, rows, neighbours


def pretrained_bn_stats(cfg: ModelConfig, model: EmbeddingModel) -> dict | None:
    """With `model.bn_stats: auto`, the pretrained running statistics kept aside to evaluate
    against (None: nothing to choose); with `pretrained`, the model keeps them fixed."""
    kept = None
    if cfg.bn_stats == "auto" and not cfg.freeze_bn:
        kept = model.bn_stats() or None
    if cfg.bn_stats == "pretrained":
        model.keep_bn_stats()
    return kept


def inference_model(
    cfg: Config, model: EmbeddingModel, input_size: tuple[int, ...], device: torch.device
) -> EmbeddingModel:
    """The model held-out embeddings come from: the one evaluate.py embeds with (see
    `Embedder.forward_model`; with `eval.fold_bn` a copy with BatchNorm folded in).

    Under bf16 autocast folding changes the rounding (embeddings move by up to ~0.5%),
    which flips near-tied neighbours: the training log's best held-out figures and
    evaluate.py on that best.pt agree only when both embed through the same model."""
    if not cfg.eval.fold_bn:
        return model
    # A private generator: drawing the probe must not shift the training RNG streams.
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(2, *input_size, generator=gen).to(device)
    fast = fold_batchnorm(model, probe)
    if fast is not model and cfg.train.channels_last:
        fast.to(memory_format=torch.channels_last)
    return fast


class HeldOut:
    """The held-out images of a run (the validation side when there is one) and how the model
    is judged on them."""

    def __init__(
        self, cfg: Config, data: RunData, model: EmbeddingModel, batches: Iterable,
        from_prefix: bool, infer_spec: InferSpec, input_size: tuple[int, ...],
        pretrained_bn: dict | None,
    ) -> None:  # fmt: skip
        self.cfg, self.data, self.model = cfg, data, model
        self.batches, self.from_prefix, self.infer_spec = batches, from_prefix, infer_spec
        self.input_size, self.pretrained_bn = input_size, pretrained_bn

    def model_for_inference(self) -> EmbeddingModel:
        return inference_model(self.cfg, self.model, self.input_size, self.infer_spec.device)

    def evaluate(self, step: int, writer: SummaryWriter | None, draw: bool) -> dict[str, float]:
        """Held-out retrieval metrics; with `draw`, also ROC AUC and EER of the verification
        pairs, and (with a writer) their PR curve, the ROC and a small query grid in
        TensorBoard at global step `step`.

        With `model.bn_stats: auto` the held-out images are embedded twice, with the running
        BatchNorm statistics training has adapted and with the pretrained ones, and the model
        keeps the better on `train.best_metric` (`pretrained_bn_stats` says which: 1 or 0).
        Batches of a few training classes can pull the statistics away from what describes
        unseen classes, while a new domain needs them adapted; only held-out data can tell."""
        key = self.cfg.train.best_metric
        candidates = [(None, 0.0)]
        if self.pretrained_bn is not None and step > 0:
            candidates.append((self.pretrained_bn, 1.0))
        chosen, adapted = None, self.model.bn_stats() if len(candidates) > 1 else None
        for stats, flag in candidates:
            if stats is not None:
                self.model.load_bn_stats(stats)
            out = self._metrics(step, with_verification=key in ("eer", "roc_auc"))
            if len(candidates) > 1:
                out[0]["pretrained_bn_stats"] = flag
            if chosen is None or better(key, out[0], chosen[1][0]):
                chosen = (stats, out)
        if chosen[0] is None and adapted is not None:
            self.model.load_bn_stats(adapted)
        metrics, embedded = chosen[1]
        if draw:
            metrics.update(self._verification(embedded, step, writer))
        return metrics

    def _metrics(self, step: int, with_verification: bool) -> tuple[dict[str, float], Embedded]:
        """Retrieval (and optionally verification) metrics of the model as it is now, with
        what drawing figures needs: (metrics, (embeddings, labels, indices, neighbours))."""
        emb, labels, indices = self.embed()
        return self.score(emb, labels, indices, step, with_verification)

    def embed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings, labels, dataset indices) of the held-out images, the model as it is."""
        return extract_embeddings(
            self.model_for_inference(),
            self.batches,
            self.infer_spec,
            from_prefix=self.from_prefix,
            desc=f"{self.data.split.selection_side} embeddings",
        )

    def score(
        self, emb: np.ndarray, labels: np.ndarray, indices: np.ndarray, step: int = 0,
        with_verification: bool = False,
    ) -> tuple[dict[str, float], Embedded]:  # fmt: skip
        """The held-out figures of given embeddings (see `_metrics`)."""
        e = self.cfg.eval
        ks = usable_ks(e.ks, len(labels) - 1)  # a small held-out set: fewer ks
        metrics, neighbours = retrieval_metrics(emb, labels, metric=e.metric, ks=ks)
        out = {k: float(v) for k, v in metrics.items()}
        embedded = (emb, labels, indices, neighbours)
        if with_verification:
            out.update(self._verification(embedded, step, None))
        return out, embedded

    def _verification(
        self, embedded: Embedded, step: int, writer: SummaryWriter | None
    ) -> dict[str, float]:
        emb, labels, indices, neighbours = embedded
        e, seed = self.cfg.eval, self.cfg.seed
        try:
            ver = verification_metrics(emb, labels, e.metric, e.verification_pairs, seed)
        except DataError as err:  # e.g. no class with two held-out images
            print(f"no held-out verification figures: {err}", file=sys.stderr)
            return {}
        if writer:
            self._draw(writer, step, embedded, ver)
        return {k: ver[k] for k in ("roc_auc", "eer", "tar_at_far_1e-2", "tar_at_far_1e-3")}

    def _draw(
        self, writer: SummaryWriter, step: int, embedded: Embedded, ver: dict[str, Any]
    ) -> None:
        """The verification PR curve, the ROC and a grid of held-out queries with their
        nearest neighbours, at global step `step`."""
        emb, labels, indices, neighbours = embedded
        e, seed = self.cfg.eval, self.cfg.seed
        pairs = tensorboard.verification_pairs(emb, labels, e.metric, ver["num_pairs"], seed)
        tensorboard.add_pr_curve(writer, f"{HELDOUT}/verification_pr", *pairs, step)
        roc = figures.render(figures.plot_roc(ver["fpr"], ver["tpr"], ver), 80)
        writer.add_image(f"{HELDOUT}/roc", roc, step, dataformats="HWC")
        held = self.data.paths(self.data.split.selection)
        paths = [held[i] for i in indices]
        grid = contact_sheet.query_grid(
            neighbours, paths, paths, self.data.folder.classes, top=4, thumb=64,
            seed=seed, n=4, metric=e.metric,
        )  # fmt: skip
        image = figures.render(grid, figures.FIGURE_DPI)
        writer.add_image(f"{HELDOUT}/queries", image, step, dataformats="HWC")
