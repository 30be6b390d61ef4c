"""`model.crop_mode: auto`: how held-out images are fitted to the model's square input, chosen
before the first step.

A center crop keeps the middle of the frame (objects in photos, where the borders are
background); squashing the whole image keeps all of it (aligned face crops, where the frame is the
subject and a center crop of a portrait-shaped 30x40 face cuts off forehead and chin). Which one
suits a set is a property of the data, not of the backbone: on the untrained backbone squashing
lowered the EER on unseen people of three of the four face sets measured (GeorgiaTech 0.285 ->
0.258, AR 0.275 -> 0.235) and raised it on the fourth (IMM, landscape 64x48: 0.027 -> 0.040), and
trained models on the three portrait-shaped sets kept that order. So the trainer embeds the
images that choose best.pt (the validation side, else the held-out side) both ways with the
untrained model, keeps the better on `train.best_metric`, and writes the choice into the run's
config: every epoch's evaluation, best.pt, evaluate, export and the bundle then use it.
Square images look the same either way, and are not embedded twice. Both looks go through
the frozen-prefix disk cache, so the winner's is not computed again and a repeated run pays
for neither."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PIL import Image

from mltrain.config import Config
from mltrain.data.pipeline import RunData, report_notes
from mltrain.model.network import EmbeddingModel, data_config
from mltrain.runtime import InferSpec
from mltrain.train.checkpoints import better
from mltrain.train.heldout import HeldOut
from mltrain.train.loaders import from_prefix, heldout_batches

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


def choose_crop_mode(cfg: Config, data: RunData, model: EmbeddingModel, spec: InferSpec,
                     notes_dir: Path | None = None) -> str:  # fmt: skip
    """The candidate geometry under which the untrained `model` scores best on the images that
    choose best.pt (the validation side, else the held-out side), on `train.best_metric`;
    center on a tie or on square images. The scores go into `notes_dir`'s notes.txt."""
    rows = data.split.selection
    if all_square(data.paths(rows)):
        report_notes([f"model.crop_mode auto: {CANDIDATES[0]} (the images are square, where a "
                      "centre crop and the squashed whole image are the same)"], notes_dir)
        return CANDIDATES[0]
    key, scores = cfg.train.best_metric, {}
    for mode in CANDIDATES:
        dcfg = data_config(model, replace(cfg.model, crop_mode=mode))
        batches = heldout_batches(cfg, data, model, dcfg, spec)  # cached, for the winner too
        held = HeldOut(cfg, data, model, batches, from_prefix(cfg, model), spec,
                       tuple(dcfg["input_size"]), None)  # fmt: skip
        scores[mode] = held.evaluate(0, None, draw=False)
    chosen = CANDIDATES[0]
    for mode in CANDIDATES[1:]:
        if better(key, scores[mode], scores[chosen]):
            chosen = mode
    said = ", ".join(f"{m} {scores[m].get(key, float('nan')):.4f}" for m in CANDIDATES)
    side = data.split.selection_side
    report_notes([f"model.crop_mode auto: {chosen} (untrained model's {side} {key}: {said})"],
                 notes_dir)  # fmt: skip
    return chosen
