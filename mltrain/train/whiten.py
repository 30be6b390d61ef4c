"""After the last epoch: a supervised whitening fitted on the training side, kept in best.pt
only when the validation side says it helps (`train.whiten: auto`).

Gradient steps on a few hundred images of a new domain move the embedding a little; whitening
the within-class scatter of those same images (see `mltrain.model.whitening`) removes the
nuisance directions they share, in closed form, and lowers the error on unseen classes of
faces and handwriting by a quarter to a third. It is judged like an epoch: on
`train.best_metric`, on the images that chose best.pt, and must beat best.pt strictly; chosen
on another metric, it must also keep best.pt's precision@1 there (on Caltech101 the
whitening that won on MAP@R pulled each class's far members in and cost 0.5 points of
precision@1).

Where `data.augment` flips images horizontally, the config says a mirror image shows the same
class (a face, an object). Then the mirror images of the training side are fitted too, as more
images of their classes (the whitening learns to ignore the mirroring), and every candidate is
also scored with mirror averaging (`eval.flip_tta`: each image and its mirror embedded and
averaged, twice the embedding time). On real faces this took the error on unseen people a
tenth lower again; the validation side decides, as for the whitening itself."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mltrain.config import Config
from mltrain.data.pipeline import RunData, eval_loader, report_notes
from mltrain.inference.batching import extract_embeddings, mirror_mean
from mltrain.model.checkpoint import load_checkpoint
from mltrain.model.network import EmbeddingModel
from mltrain.model.whitening import (
    Whitening,
    WhiteningFit,
    fit_whitening,
    max_dims,
    whitening_candidates,
)
from mltrain.train.checkpoints import better, save_checkpoint
from mltrain.train.heldout import HeldOut

DIMS = [128, 256, 512, 1024]  # output dimensions tried (capped by what the data can estimate)
SHRINKAGES = [0.03, 0.1, 0.3, 1.0]  # towards the identity, as a fraction of the mean eigenvalue
MAX_IMAGES = 4000  # training images embedded for the fit: enough for 256 dimensions
GUARD = "precision_at_1"  # retrieval's headline: a whitening chosen on another may not lower it
# A candidate: (held-out figures, whitening or None, mirror averaging, which fit source)
Chosen = tuple[dict[str, float], WhiteningFit | None, bool, int]


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


class Mirrored(nn.Module):
    """`model` embedding each image's mirror (the left-right flip)."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model, self.normalize = model, model.normalize

    def embed(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        return self.model.embed(x.flip(3))


def flips_images(cfg: Config) -> bool:
    """Whether `data.augment` mirrors training images, i.e. a mirror image keeps its class."""
    return any(isinstance(t, dict) and t.get("name") == "HorizontalFlip" and
               (t.get("args") or {}).get("p", 0.5) > 0 for t in cfg.data.augment or [])  # fmt: skip


def averaged(a: np.ndarray, b: np.ndarray, normalize: bool) -> np.ndarray:
    """Mirror averaging of embeddings already computed, as `eval.flip_tta` embeds it."""
    return mirror_mean(torch.from_numpy(a), torch.from_numpy(b), normalize).numpy()


def whiten_best(
    cfg: Config, data: RunData, model: EmbeddingModel, heldout: HeldOut, dcfg: dict,
    run_dir: Path,
) -> dict[str, Any] | None:  # fmt: skip
    """Fit whitenings on the training side's embeddings by best.pt, score each on the held-out
    (validation) images, with and without mirror averaging where the config flips images,
    and when one beats best.pt on `train.best_metric` write it into best.pt. Returns the new
    best figures, or None when best.pt stays as it was."""
    key, path = cfg.train.best_metric, run_dir / "checkpoints" / "best.pt"
    rows = training_rows(data, cfg.seed)
    labels = data.folder.labels[rows]
    if max_dims(len(rows), len(np.unique(labels)), model.trained_dim) < 2:
        report_notes(["whitening: too few training images per class to fit one; best.pt stays "
                      "as it was"], run_dir)  # fmt: skip
        return None
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"], strict=True)
    inference = heldout.model_for_inference()
    embed = partial(_embed, cfg, dcfg, heldout.infer_spec)  # flip_tta off where mirrors are tried
    train_emb = embed(inference, data.paths(rows), labels, "training embeddings")
    emb, held_labels, indices = heldout.embed()
    # every figure best.pt keeps is re-measured with the whitening: EER and ROC AUC too where
    # training measured them, or they would describe the model before it
    verify = key in ("eer", "roc_auc") or "eer" in ckpt["best"]
    side = data.split.selection_side

    def score(x: np.ndarray) -> dict[str, float]:
        return heldout.score(x, held_labels, indices, with_verification=verify)[0]

    base = score(emb)
    chosen: Chosen = (base, None, False, 0)
    pick = partial(_pick, key, base.get(GUARD, 0.0))
    sources = [(train_emb, labels)]
    mirror = None
    if flips_images(cfg) and not cfg.eval.flip_tta:
        mirrored = Mirrored(inference)
        held = data.paths(data.split.selection[indices])  # in the order heldout.embed gave
        mirror = embed(mirrored, held, held_labels, f"{side} mirror embeddings")
        train_mirror = embed(mirrored, data.paths(rows), labels, "training mirror embeddings")
        sources.append((np.vstack([train_emb, train_mirror]), np.concatenate([labels, labels])))
    for x, fit, flip, source in _candidates(sources, emb, mirror, model.normalize):
        chosen = pick(chosen, (score(x), fit, flip, source))
    seen = f"{len(rows)} training images of {len(np.unique(labels))} classes"
    seen += " and their mirror images" if mirror is not None else ""
    scored, fit, flip, source = chosen
    if fit is not None and len(data.split.val):
        more = [emb, mirror] if source == 1 else [emb]
        fit = _refit(fit, *sources[source], more, held_labels)
        seen += f", refitted with the {len(emb)} validation images"
        seen += " and mirrors" if source == 1 else ""
        seen += " (the figure is the fit before they joined it: they cannot score themselves)"
    return _keep(cfg, ckpt, model, run_dir, base, (scored, fit, flip), (seen, side))


def _candidates(sources: list[tuple[np.ndarray, np.ndarray]], emb: np.ndarray,
                mirror: np.ndarray | None, normalize: bool) -> Iterator[tuple]:  # fmt: skip
    """Every (held-out embeddings, fit, mirror averaged, source) to score: mirror averaging
    alone (where there are mirrors), then each whitening fitted on each source of training
    embeddings, plain and mirror averaged."""
    if mirror is not None:
        yield averaged(emb, mirror, normalize), None, True, 0
    for source, (x, y) in enumerate(sources):
        for fit in whitening_candidates(x, y, DIMS, SHRINKAGES):
            yield fit.apply(emb), fit, False, source
            if mirror is not None:
                yield averaged(fit.apply(emb), fit.apply(mirror), normalize), fit, True, source


def _refit(fit: WhiteningFit, x: np.ndarray, y: np.ndarray, more: list[np.ndarray],
           more_labels: np.ndarray) -> WhiteningFit:  # fmt: skip
    """The chosen whitening fitted again with the validation images added: once they have
    chosen, they are more classes to estimate the within-class scatter from. Never the test
    side: only a split with validation classes comes here."""
    labels = np.concatenate([y, *[more_labels] * len(more)])
    return fit_whitening(np.vstack([x, *more]), labels, fit.dims, fit.shrinkage)


def _embed(cfg: Config, dcfg: dict, spec: Any, model: nn.Module, paths: list, labels: np.ndarray,
           desc: str) -> np.ndarray:  # fmt: skip
    """Embeddings of `paths` in order, through the full model (no cached prefix)."""
    out, _, order = extract_embeddings(model, eval_loader(cfg, paths, labels, dcfg), spec,
                                       desc=desc)  # fmt: skip
    return out[np.argsort(order, kind="stable")]


def _pick(key: str, floor: float, chosen: Chosen, candidate: Chosen) -> Chosen:
    """`candidate` where it beats `chosen` on `key` without taking precision@1 below `floor`
    (best.pt's)."""
    if key != GUARD and candidate[0].get(GUARD, floor) < floor:
        return chosen
    return candidate if better(key, candidate[0], chosen[0]) else chosen


def _keep(cfg: Config, ckpt: dict, model: EmbeddingModel, run_dir: Path, base: dict[str, float],
          chosen: tuple, said: tuple[str, str]) -> dict[str, Any] | None:  # fmt: skip
    """Write the chosen whitening and mirror averaging into best.pt and say so: `said` is
    what it was fitted on and which side scored it."""
    key, (seen, side) = cfg.train.best_metric, said
    scored, fit, flip = chosen
    if fit is None and not flip:
        figure = base.get(key, float("nan"))
        kept = "" if key == GUARD else f" without lowering its {GUARD} {base.get(GUARD, 0):.4f}"
        report_notes([f"whitening: fitted on {seen}, none beat best.pt's {side} {key} "
                      f"{figure:.4f}{kept}; best.pt stays as it was"], run_dir)  # fmt: skip
        return None
    if fit is not None:
        model.set_whitening(Whitening.from_fit(fit))
    config = ckpt["config"]
    if flip:
        config = {**config, "eval": {**config.get("eval", {}), "flip_tta": True}}
    extra = {"whiten_dims": fit.dims, "whiten_shrinkage": fit.shrinkage} if fit else {}
    best = {**ckpt["best"], **scored, **extra, "flip_tta": float(flip)}
    save_checkpoint({**ckpt, "model": model.state_dict(), "config": config, "best": best},
                    run_dir, "best.pt")  # fmt: skip
    what = f"{fit.dims} dimensions, shrinkage {fit.shrinkage:g}" if fit else "no whitening"
    if flip:
        what += "; mirror averaging on: each image and its mirror embedded, 2x the time"
    report_notes([f"whitening: fitted on {seen}; {side} {key} {base[key]:.4f} -> "
                  f"{scored[key]:.4f} ({what}); best.pt embeds through it"], run_dir)  # fmt: skip
    return best
