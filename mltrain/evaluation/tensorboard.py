"""The report's TensorBoard part: held-out scalars, hparams, PR curves and the projector.

Training and evaluation runs share one layout: a step axis (the global optimizer step), the
`train` group (loss, lr, throughput; training only) listed before the held-out `val` group,
the same curated hparams and the same declared metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from mltrain.evaluation.contact_sheet import thumbnail
from mltrain.evaluation.figures import FIGURE_DPI, render, sample_rows
from mltrain.evaluation.markdown import (
    fmt,
    index_section,
    is_scalar,
    md_table,
    pca_section,
    timing_section,
    verification_section,
    worst_below_mean,
)
from mltrain.evaluation.metrics import class_name
from mltrain.retrieval.pairs import pair_scores, sample_pairs

PROJECTOR_MAX_POINTS = 1000


SPRITE_SIZE = 32


# Held-out figures go under this group, training's under "train": TensorBoard lists groups
# alphabetically, so the loss chart comes first.
HELDOUT = "val"


# The held-out curves, each telling something the others do not: precision@1 (the top result),
# MAP@R (the whole ranking), ROC AUC and EER (verification overall and at its balance point)
# and TAR at FAR 1e-3 (a strict deployed threshold). recall@1 equals precision@1 and mAP
# tracks MAP@R; they stay in report.md and metrics.json, off the charts.
HELDOUT_RETRIEVAL = ("precision_at_1", "map_at_r")


HELDOUT_VERIFICATION = ("roc_auc", "eer", "tar_at_far_1e-3")


# What the HParams tab compares, declared alike by training and evaluation runs (runs that
# declare different lists lose one list's columns). Training logs the last evaluation's value.
HPARAM_METRICS = tuple(f"{HELDOUT}/{k}" for k in (*HELDOUT_RETRIEVAL, *HELDOUT_VERIFICATION))


PROJECTOR_HEADER = ["class", "top1_correct", "top1_class", "file", "worst_class"]


def heldout_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The held-out curves as TensorBoard tags val/<key>: `HELDOUT_RETRIEVAL`, and the
    `HELDOUT_VERIFICATION` figures (from `metrics["verification"]`, or flat keys as the
    training loop keeps them).

    The training loop and evaluate.py both write these tags at the global optimizer step, so
    an evaluated checkpoint is a point on its training curve. Counts, sizes, timings and the
    other metrics are not curves worth a chart: they go to `diagnostics_markdown` and report.md.
    """
    ver = {**metrics, **(metrics.get("verification") or {})}
    return {
        f"{HELDOUT}/{k}": float(ver[k])
        for k in (*HELDOUT_RETRIEVAL, *HELDOUT_VERIFICATION)
        if is_scalar(ver.get(k))
    }


def diagnostics_markdown(metrics: Mapping[str, Any], timing: Mapping[str, float]) -> str:
    """Sizes, counts, timings, one-shot, the PCA sweep and the index comparison as Markdown
    tables for TensorBoard's Text tab: single numbers that would each be a one-dot chart."""
    counts = [
        (key.replace("_", " "), fmt(metrics[key]))
        for key in ("num_queries", "num_lone_queries", "embedding_dim", "search_k")
        if key in metrics
    ]
    ver = metrics.get("verification") or {}
    if "num_pairs" in ver:
        counts.append(("verification pairs", fmt(ver["num_pairs"])))
    lines = ["## Counts", "", *md_table(["what", "value"], counts), ""] if counts else []
    lines += verification_section({"one_shot": metrics.get("one_shot") or {}})
    lines += pca_section(metrics) + index_section(metrics)
    lines += timing_section(metrics, timing)
    return "\n".join(lines)


def _name(component: Any) -> str:
    """A config component's name (`{name: ..., args: ...}`), or "none"."""
    if isinstance(component, Mapping):
        return str(component.get("name") or "none")
    return "none" if component is None else str(component)


def _arg(component: Any, key: str, default: Any) -> Any:
    args = component.get("args") if isinstance(component, Mapping) else None
    value = (args or {}).get(key, default)
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def run_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """The few settings that tell runs apart in the HParams table (the whole config is in the
    Text tab): model, loss and batch composition, optimisation, data. A setting left to the
    backbone (image size, embedding length) reads "auto"; strings stay strings so a column
    has one type."""
    data, model = config.get("data") or {}, config.get("model") or {}
    train = config.get("train") or {}
    optimizer, sampler = train.get("optimizer"), train.get("sampler")
    size, dim = model.get("image_size"), model.get("embedding_dim")
    frozen = model.get("frozen_stages")
    trainable = model.get("trainable_stages")  # the other way to say frozen_stages
    return {
        "backbone": str(model.get("backbone", "none")),
        "pretrained": str(model.get("pretrained", "none")),
        "pooling": _name(model.get("pooling")),
        "head": bool(model.get("head", False)),
        "frozen_stages": "unset" if frozen is None else str(frozen),
        "trainable_stages": "unset" if trainable is None else str(trainable),
        "image_size": "auto" if size is None else str(size),
        "embedding_dim": "auto" if dim is None else str(dim),
        "loss": _name(train.get("loss")),
        "miner": _name(train.get("miner")),
        "sampler": _name(sampler),
        "m_per_class": _arg(sampler, "m", 0),
        "optimizer": _name(optimizer),
        "lr": _arg(optimizer, "lr", 0.0),
        "weight_decay": _arg(optimizer, "weight_decay", 0.0),
        "epochs": int(train.get("epochs") or 0),
        "batch_size": int(train.get("batch_size") or 0),
        "split": str(data.get("split", "none")),
        "train_fraction": float(data.get("train_fraction") or 0.0),
        "seed": int(config.get("seed") or 0),
    }


def add_hparams(
    writer: SummaryWriter,
    config: Mapping[str, Any],
    step: int = 0,
    finished: bool = False,
) -> None:
    """The hparams plugin's summaries in `writer`'s own run: `run_hparams(config)` and
    `HPARAM_METRICS` (tags of this run) as the metrics the HParams tab shows for it.

    `SummaryWriter.add_hparams` would write into a new sub-folder, i.e. a second run next to
    the training curves; the plugin's summary protos (torch's `summary.hparams`) written to
    this run keep the table and the curves together. `finished` adds the run's end.
    """
    metrics = dict.fromkeys(HPARAM_METRICS, 0.0)
    experiment, start, end = hparams(run_hparams(config), metrics)
    for summary in (experiment, start, end) if finished else (experiment, start):
        writer.file_writer.add_summary(summary, step)


def verification_pairs(
    emb: np.ndarray, labels: np.ndarray, metric: str, num_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(same class?, pair score) of `num_pairs` pairs drawn as `verification_metrics` draws
    them (same sampler, same seed), for the PR curve."""
    i, j, same = sample_pairs(labels, num_pairs, seed)
    return same, pair_scores(emb, i, j, metric)


def add_pr_curve(
    writer: SummaryWriter, tag: str, same: np.ndarray, scores: np.ndarray, step: int
) -> None:
    """The verification pairs' precision-recall curve. TensorBoard wants predictions in
    [0, 1]: the scores are min-max scaled (monotone, so the curve is unchanged up to the 201
    thresholds)."""
    scores = np.asarray(scores, dtype=np.float64)
    low, span = scores.min(), np.ptp(scores)
    scaled = (scores - low) / span if span > 0 else np.full_like(scores, 0.5)
    writer.add_pr_curve(tag, np.asarray(same, dtype=np.int64), scaled, step, num_thresholds=201)


def _tsv_safe(name: str) -> str:
    """The projector's metadata is one TSV line per point; tabs or newlines would shift rows."""
    return " ".join(str(name).split()) or "?"


def projector_metadata(
    labels: np.ndarray,
    class_names: Sequence[str],
    paths: Sequence[str | Path],
    neighbours: Any | None = None,
    worst: Sequence[str] = (),
) -> list[list[str]]:
    """One row per held-out image under `PROJECTOR_HEADER`: class, whether its top-1 result
    has its class (yes/no; "lone" when no other image has it), the top-1 result's class, the
    file name and whether the class is among the worst. The yes/no columns have few values, so
    the projector can colour by them whatever the number of classes (it stops at 50)."""
    worst_set = set(worst)
    rows = []
    for i, label in enumerate(labels):
        name = class_name(label, class_names)
        correct, top1 = "n/a", "n/a"
        if neighbours is not None:
            idx = int(neighbours.indices[i, 0])
            top1 = class_name(neighbours.labels[i, 0], class_names) if idx >= 0 else "(none)"
            if not neighbours.scored[i]:
                correct = "lone"
            else:
                correct = "yes" if idx >= 0 and neighbours.labels[i, 0] == label else "no"
        rows.append(
            [
                _tsv_safe(name),
                correct,
                _tsv_safe(top1),
                _tsv_safe(Path(paths[i]).name),
                "yes" if name in worst_set else "no",
            ]
        )
    return rows


def add_projector(
    writer: SummaryWriter,
    emb: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    paths: Sequence[str | Path],
    max_points: int = PROJECTOR_MAX_POINTS,
    seed: int = 0,
    neighbours: Any | None = None,
    worst: Sequence[str] = (),
    step: int = 0,
) -> int:
    """Held-out embeddings in TensorBoard's projector with `projector_metadata` columns and
    32 x 32 thumbnails, for at most `max_points` seeded-sampled points; returns how many.

    The cap keeps the sprite one readable image and the projector's text tensor file small
    (it writes every float as text: 10k x 1280 would be ~150 MB).
    """
    rows = sample_rows(len(labels), max_points, seed)
    images = np.stack([thumbnail(paths[i], SPRITE_SIZE) for i in rows])
    label_img = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    metadata = projector_metadata(labels, class_names, paths, neighbours, worst)
    writer.add_embedding(
        np.asarray(emb)[rows],
        metadata=[metadata[i] for i in rows],
        label_img=label_img,
        global_step=step,
        tag="heldout",
        metadata_header=PROJECTOR_HEADER,
    )
    return len(rows)


def write_tensorboard(
    out_dir: Path,
    metrics: Mapping[str, Any],
    images: Mapping[str, np.ndarray | Figure],
    split: Any | None = None,
    seed: int = 0,
    *,
    step: int = 0,
    neighbours: Any | None = None,
    texts: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """An evaluation in TensorBoard, at global step `step` (the checkpoint's optimizer step):
    `heldout_scalars`, figures under report/<name> (rendered H x W x 3 arrays, or figures),
    `texts` (tag -> Markdown), the PR curve of the verification `pairs`, the hparams summary
    of `config` with the held-out metrics and, given the split, the projector."""
    scalars = heldout_scalars(metrics)
    with SummaryWriter(str(out_dir)) as writer:
        if config is not None:
            add_hparams(writer, config, step, finished=True)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        for name, image in images.items():
            if isinstance(image, Figure):
                image = render(image, FIGURE_DPI)
            writer.add_image(f"report/{name}", image, step, dataformats="HWC")
        for tag, text in (texts or {}).items():
            writer.add_text(tag, text, step)
        if pairs is not None:
            add_pr_curve(writer, f"{HELDOUT}/verification_pr", *pairs, step)
        if split is not None and len(split.heldout_paths) == len(split.heldout_labels):
            add_projector(
                writer,
                split.heldout_emb,
                split.heldout_labels,
                split.classes,
                split.heldout_paths,
                seed=seed,
                neighbours=neighbours,
                worst=[name for name, _ in worst_below_mean(metrics)],
                step=step,
            )
