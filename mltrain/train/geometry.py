"""`model.crop_mode: auto`: how held-out images are fitted to the model's square input, chosen on
the validation images before the first step.

A center crop keeps the middle of the frame (objects in photos, where the borders are
background); squashing the whole image keeps all of it (aligned face crops, where the frame is the
subject and a center crop of a portrait-shaped 30x40 face cuts off forehead and chin). Which one
suits a set is a property of the data, not of the backbone: on the untrained backbone squashing
lowered the EER on unseen people of three of the four face sets measured (GeorgiaTech 0.285 ->
0.258, AR 0.275 -> 0.235) and raised it on the fourth (IMM, landscape 64x48: 0.027 -> 0.040), and
the trained models followed the same choice. So the trainer embeds the validation images both
ways with the untrained model, keeps the better on `train.best_metric`, and writes the choice into
the run's config: every epoch's evaluation, best.pt, evaluate, export and the bundle then use it.
Square images look the same either way, and are not embedded twice."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image

from mltrain.config import Config
from mltrain.data.pipeline import RunData, eval_loader
from mltrain.model.network import EmbeddingModel, data_config
from mltrain.runtime import InferSpec
from mltrain.train.checkpoints import better
from mltrain.train.heldout import HeldOut

CANDIDATES = ("center", "squash")
SAMPLE = 200  # images whose header is read to tell whether a set is square


def all_square(paths: list[Path], most: int = SAMPLE) -> bool:
    """Whether the images (a spread of at most `most` of them) are all square. Reads headers
    only; an image PIL cannot open counts as not square (the embedding pass decides then)."""
    step = max(len(paths) // most, 1)
    for path in paths[::step]:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception:  # noqa: BLE001 - any unreadable header: embed both ways
            return False
        if width != height:
            return False
    return True


def choose_crop_mode(cfg: Config, data: RunData, model: EmbeddingModel, spec: InferSpec) -> str:
    """The candidate geometry under which the untrained `model` scores best on the held-out
    (validation) images, on `train.best_metric`; center on a tie or on square images."""
    rows = data.split.selection
    paths, labels = data.paths(rows), data.folder.labels[rows]
    if all_square(paths):
        return CANDIDATES[0]
    key, scores = cfg.train.best_metric, {}
    for mode in CANDIDATES:
        dcfg = data_config(model, replace(cfg.model, crop_mode=mode))
        batches = eval_loader(cfg, paths, labels, dcfg)
        held = HeldOut(cfg, data, model, batches, False, spec, tuple(dcfg["input_size"]), None)
        scores[mode] = held.evaluate(0, None, draw=False)
    chosen = CANDIDATES[0]
    for mode in CANDIDATES[1:]:
        if better(key, scores[mode], scores[chosen]):
            chosen = mode
    said = ", ".join(f"{m} {scores[m].get(key, float('nan')):.4f}" for m in CANDIDATES)
    print(f"model.crop_mode auto: {chosen} (untrained model's held-out {key}: {said})",
          file=sys.stderr)  # fmt: skip
    return chosen
