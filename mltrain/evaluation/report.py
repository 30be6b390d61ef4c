"""The evaluation report: TensorBoard events, PNG figures and a Markdown summary, written
together (`figures`, `tensorboard` and `markdown` build each part).

`write_report` turns an `mltrain.evaluation.evaluate.EvalResult` into files a person reads: numbers
alone hide *which* classes fail and *how* (a cluster split in two, two classes merged), so the
report adds pictures of the embedding space and of real queries next to the tables.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, never through
pyplot: no global backend switch, no figure registry to leak, safe in notebooks and threads.
Nothing here builds an N x N matrix: the query grid reuses the neighbours the metrics kept,
and t-SNE runs on a bounded sample.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from mltrain.evaluation.contact_sheet import queries_note, query_grid, select_queries, top1_right
from mltrain.evaluation.figures import FIGURE_DPI, plot_pca, plot_roc, plot_tsne, render
from mltrain.evaluation.markdown import markdown_report, worst_below_mean
from mltrain.evaluation.plan import TSNE_MIN_POINTS
from mltrain.evaluation.tensorboard import (
    PROJECTOR_HEADER,
    PROJECTOR_MAX_POINTS,
    diagnostics_markdown,
    verification_pairs,
    write_tensorboard,
)


def gallery_problem(
    neighbours: Any, gallery_paths: Sequence[Any], gallery_labels: np.ndarray | None
) -> str | None:
    """Why the neighbours' rows cannot be shown with `gallery_paths`, or None when they can.

    Neighbour indices are rows of whatever gallery the search used (held-out in
    leave-one-out, the training set for gallery "train"); showing them against the wrong
    path list would silently draw wrong pictures, so labels are checked where known.
    """
    idx = np.asarray(neighbours.indices)
    if idx.size == 0:
        return "no neighbours were kept, so there is no query grid"
    if idx.max() >= len(gallery_paths):
        return (
            f"neighbour rows go up to {idx.max()} but only {len(gallery_paths)} gallery "
            "paths were given; pass the search gallery's paths as gallery_paths"
        )
    if gallery_labels is not None:
        valid = idx >= 0
        if not np.array_equal(
            np.asarray(gallery_labels)[idx[valid]], np.asarray(neighbours.labels)[valid]
        ):
            return (
                "the neighbours were searched in another gallery than the held-out images "
                "(eval.gallery: train?); pass its paths as gallery_paths for a query grid"
            )
    return None


def untrained_baseline(source: Any, step: int) -> dict[str, Any] | None:
    """The held-out metrics training measured before its first step (metrics.json "start"),
    for a checkpoint in `<run>/checkpoints/`: the same images this evaluation embeds, unless
    the run chose its best on a separate validation part. None where unknown."""
    if step <= 0 or not source:
        return None
    path = Path(str(source))
    if path.suffix != ".pt" or path.parent.name != "checkpoints":
        return None
    try:
        summary = json.loads((path.parent.parent / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    start = summary.get("start") if isinstance(summary, dict) else None
    if not isinstance(start, dict) or summary.get("selected_on", "heldout") != "heldout":
        return None
    return start or None


def data_summary(split: Any, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What report.md's first line says about the data: counts from the embedded split, the
    split kind from the config."""
    held = np.asarray(split.heldout_labels)
    present = np.unique(held)
    out: dict[str, Any] = {"heldout_images": len(held), "heldout_classes": len(present)}
    classes = getattr(split, "classes", None)
    if classes is not None:
        out["heldout_class_names"] = [classes[int(i)] for i in present]
    if not getattr(split, "same_set", False):
        out["train_images"] = len(split.train_labels)
    kind = ((config or {}).get("data") or {}).get("split")
    if kind:
        out["split"] = kind
    return out


def misses(neighbours: Any, n: int) -> np.ndarray:
    """Per held-out row: whether it was scored and its top result has another class."""
    wrong = np.zeros(n, dtype=bool)
    scored, right = top1_right(neighbours)
    wrong[scored[~right]] = True
    return wrong


def write_report(
    out_dir: Path,
    result: Any,
    tsne: bool = True,
    tsne_max_points: int = 3000,
    seed: int = 0,
    gallery_paths: Sequence[str | Path] | None = None,
    step: int = 0,
    config: Mapping[str, Any] | None = None,
    metric: str = "cosine",
    baseline: Mapping[str, Any] | None = None,
) -> None:
    """Write report.md, roc/pca/tsne/tsne_worst/queries PNGs and TensorBoard events to out_dir.

    `result` is an `mltrain.evaluation.evaluate.EvalResult`. `gallery_paths` are the images the
    neighbour rows point at; the default, the held-out paths, is right for leave-one-out
    evaluation. t-SNE pictures are skipped with `tsne=False` (they dominate the run time);
    the same `seed` samples the same points, so reports of two checkpoints compare directly.
    `step` is the checkpoint's global optimizer step: the held-out scalars land on the
    training curves (see `write_tensorboard`); `config` (a config as a dict) goes to the
    HParams tab; `metric` names the search score on the query grid and the PR curve's pairs.
    `baseline` (the untrained model's held-out metrics; by default found with
    `untrained_baseline`) goes next to this model's in report.md's summary.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m, split = result.metrics, result.split
    figures: dict[str, Figure] = {}
    notes: list[str] = []  # figures' notes; markdown_report puts metrics["notes"] first
    timing: dict[str, float] = {}
    curves = result.curves or {}
    ver = m.get("verification") or {}
    if curves.get("fpr") and curves.get("tpr"):
        figures["roc"] = plot_roc(curves["fpr"], curves["tpr"], ver)
    if m.get("pca"):
        figures["pca"] = plot_pca(list(m["pca"].values()), m.get("pca_shortest_within_0.5"))
    if tsne:
        start = time.perf_counter()
        wrong = misses(result.neighbours, len(split.heldout_labels)) \
            if result.neighbours is not None else None
        figures.update(_tsne_figures(split, m, tsne_max_points, seed, notes, wrong))
        timing["report_tsne_seconds"] = time.perf_counter() - start
    if result.neighbours is not None:
        default = gallery_paths is None
        paths = list(split.heldout_paths) if default else list(gallery_paths)
        problem = gallery_problem(
            result.neighbours, paths, split.heldout_labels if default else None
        )
        if problem:
            notes.append(f"No query grid: {problem}.")
        else:
            figures["queries"] = query_grid(
                result.neighbours, split.heldout_paths, paths, split.classes, seed=seed,
                metric=metric,
            )
            rows = select_queries(result.neighbours, seed=seed)
            notes.append(f"queries.png: {queries_note(result.neighbours, rows, seed)}")
    n_held = len(split.heldout_labels)
    shown = min(n_held, PROJECTOR_MAX_POINTS)
    notes.append(
        f"The TensorBoard projector holds {shown} of the {n_held} held-out embeddings"
        + (f" (a uniform sample, seed {seed})" if shown < n_held else "")
        + f"; its metadata columns: {', '.join(PROJECTOR_HEADER)}."
    )
    images = {name: render(fig, FIGURE_DPI) for name, fig in figures.items()}
    for name, image in images.items():
        Image.fromarray(image).save(out_dir / f"{name}.png")
    if baseline is None:
        baseline = untrained_baseline(m.get("source"), step)
    data = data_summary(split, config)
    text = markdown_report(
        m, [f"{name}.png" for name in figures], notes, timing, data, baseline
    )
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    pairs = None
    if ver.get("num_pairs"):
        pairs = verification_pairs(
            split.heldout_emb, split.heldout_labels, metric, int(ver["num_pairs"]), seed
        )
    # TensorBoard shows the figures in its Images tab; relative image links would be broken.
    text_only = markdown_report(m, (), notes, timing, data, baseline)
    write_tensorboard(
        out_dir,
        m,
        images,
        split,
        seed,
        step=step,
        neighbours=result.neighbours,
        texts={
            "eval/report": text_only,
            "eval/diagnostics": diagnostics_markdown(m, {**(m.get("timing") or {}), **timing}),
        },
        config=config,
        pairs=pairs,
    )


def _tsne_figures(
    split: Any, m: Mapping[str, Any], max_points: int, seed: int, notes: list[str],
    wrong: np.ndarray | None = None,
) -> dict[str, Figure]:
    """The held-out t-SNE and the worst classes' own, each only with `TSNE_MIN_POINTS` or
    more points: on fewer the layout is mostly t-SNE's randomness, read as structure."""
    figures = {}
    n = min(len(split.heldout_labels), max_points)
    if n < TSNE_MIN_POINTS:
        notes.append(f"No t-SNE: {n} held-out embeddings, fewer than the {TSNE_MIN_POINTS} "
                     "a t-SNE picture needs to show more than chance.")
        return figures
    worst = [name for name, _ in worst_below_mean(m)]
    figures["tsne"] = plot_tsne(
        split.heldout_emb, split.heldout_labels, split.classes, max_points, seed,
        highlight=worst, misses=wrong,
    )  # fmt: skip
    ids = [i for i, name in enumerate(split.classes) if name in set(worst)]
    in_worst = min(int(np.isin(split.heldout_labels, ids).sum()), max_points)
    if not worst:
        pass  # nothing below the mean: the worst-class table says so
    elif in_worst >= TSNE_MIN_POINTS:
        figures["tsne_worst"] = plot_tsne(
            split.heldout_emb,
            split.heldout_labels,
            split.classes,
            max_points,
            seed,
            keep_classes=worst,
            title=f"t-SNE of the {len(worst)} worst classes",
            misses=wrong,
        )
    else:
        notes.append(f"No worst-class t-SNE: the {len(worst)} worst classes have {in_worst} "
                     f"held-out embeddings, fewer than {TSNE_MIN_POINTS}; see them in tsne.png "
                     "and in the worst-class table.")
    return figures
