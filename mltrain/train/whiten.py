"""After the last epoch: a supervised whitening fitted on the training side, kept in best.pt
only when the validation side says it helps (`train.whiten: auto`).

Gradient steps on a few hundred images of a new domain move the embedding a little; whitening
the within-class scatter of those same images (see `mltrain.model.whitening`) removes the
nuisance directions they share, in closed form, and lowers the error on unseen classes of
faces and handwriting by a quarter to a third. It is judged like an epoch: on
`train.best_metric`, on the images that chose best.pt, and must beat best.pt strictly."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from mltrain.config import Config
from mltrain.data.pipeline import RunData, eval_loader
from mltrain.inference.batching import extract_embeddings
from mltrain.model.checkpoint import load_checkpoint
from mltrain.model.network import EmbeddingModel
from mltrain.model.whitening import Whitening, max_dims, whitening_candidates
from mltrain.train.checkpoints import better, save_checkpoint
from mltrain.train.heldout import HeldOut

DIMS = [128, 256, 512, 1024]  # output dimensions tried (capped by what the data can estimate)
SHRINKAGES = [0.03, 0.1, 0.3, 1.0]  # towards the identity, as a fraction of the mean eigenvalue
MAX_IMAGES = 4000  # training images embedded for the fit: enough for 256 dimensions


def training_rows(data: RunData, seed: int, most: int = MAX_IMAGES) -> np.ndarray:
    """The training side's rows, at most `most`, taken evenly across classes (seeded)."""
    rows = np.asarray(data.split.train)
    if len(rows) <= most:
        return rows
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows)
    labels = data.folder.labels[order]
    rank = np.zeros(len(order), int)  # each row's position within its class, in shuffled order
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    return np.sort(order[np.argsort(rank, kind="stable")[:most]])


def whiten_best(
    cfg: Config, data: RunData, model: EmbeddingModel, heldout: HeldOut, dcfg: dict,
    run_dir: Path,
) -> dict[str, Any] | None:  # fmt: skip
    """Fit whitenings on the training side's embeddings by best.pt, score each on the held-out
    (validation) images, and when one beats best.pt on `train.best_metric` write it into
    best.pt. Returns the new best figures, or None when best.pt stays as it was."""
    key, path = cfg.train.best_metric, run_dir / "checkpoints" / "best.pt"
    rows = training_rows(data, cfg.seed)
    labels = data.folder.labels[rows]
    if max_dims(len(rows), len(np.unique(labels)), model.trained_dim) < 2:
        print("whitening: too few training images per class to fit one; best.pt stays as it was",
              file=sys.stderr)  # fmt: skip
        return None
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"], strict=True)
    loader = eval_loader(cfg, data.paths(rows), labels, dcfg)
    inference = heldout.model_for_inference()
    train_emb, train_labels, _ = extract_embeddings(
        inference, loader, heldout.infer_spec, desc="training embeddings"
    )
    emb, held_labels, indices = heldout.embed()
    verify = key in ("eer", "roc_auc")
    base, _ = heldout.score(emb, held_labels, indices, with_verification=verify)
    chosen, chosen_fit = base, None
    for fit in whitening_candidates(train_emb, train_labels, DIMS, SHRINKAGES):
        scored, _ = heldout.score(fit.apply(emb), held_labels, indices, with_verification=verify)
        if better(key, scored, chosen):
            chosen, chosen_fit = scored, fit
    seen = f"{len(rows)} training images of {len(np.unique(labels))} classes"
    if chosen_fit is None:
        figure = base.get(key, float("nan"))
        print(f"whitening: fitted on {seen}, none beat best.pt's held-out {key} {figure:.4f}; "
              "best.pt stays as it was", file=sys.stderr)  # fmt: skip
        return None
    model.set_whitening(Whitening.from_fit(chosen_fit))
    best = {**ckpt["best"], **chosen, "whiten_dims": chosen_fit.dims,
            "whiten_shrinkage": chosen_fit.shrinkage}  # fmt: skip
    save_checkpoint({**ckpt, "model": model.state_dict(), "best": best}, run_dir, "best.pt")
    print(f"whitening: fitted on {seen}; held-out {key} {base[key]:.4f} -> {chosen[key]:.4f} "
          f"({chosen_fit.dims} dimensions, shrinkage {chosen_fit.shrinkage:g}); best.pt embeds "
          "through it", file=sys.stderr)  # fmt: skip
    return best
