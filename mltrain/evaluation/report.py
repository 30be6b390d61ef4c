"""The evaluation report: TensorBoard events, PNG figures and a Markdown summary.

`write_report` turns an `mltrain.evaluation.evaluate.EvalResult` into files a person reads: numbers
alone hide *which* classes fail and *how* (a cluster split in two, two classes merged), so the
report adds pictures of the embedding space and of real queries next to the tables.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, never through
pyplot: no global backend switch, no figure registry to leak, safe in notebooks and threads.
Nothing here builds an N x N matrix: the query grid reuses the neighbours the metrics kept,
and t-SNE runs on a bounded sample.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image, ImageOps
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from mltrain.data.images import load_image
from mltrain.errors import DataError
from mltrain.evaluation.metrics import class_name, pair_scores, sample_pairs

GREEN = (0, 160, 0)
RED = (220, 0, 0)
MISSING_GREY = 128  # tile shown for an image that no longer decodes
LEGEND_MAX_CLASSES = 20
PROJECTOR_MAX_POINTS = 1000
SPRITE_SIZE = 32
TSNE_PCA_DIMS = 50
TSNE_MAX_ITER = 750
WORST_CLASSES = 10
FIGURE_DPI = 120
# A log-x ROC only shows more than the linear one when FAR 1e-3 is resolvable: 1000 impostors.
LOG_ROC_MIN_PAIRS = 2000

# (key, label, one line for the reader of report.md)
HEADLINE = (
    ("precision_at_1", "precision@1", "share of queries whose nearest other image has their class"),
    ("precision_at_5", "precision@5", "share of the 5 nearest results with the query's class"),
    ("precision_at_10", "precision@10", "share of the 10 nearest results with the query's class"),
    ("recall_at_5", "recall@5", "share of queries with a same-class image among the 5 nearest"),
    (
        "map_at_r",
        "MAP@R",
        "average precision over the first R results (R: the query's same-class images); "
        "1 when all of them come first",
    ),
    ("r_precision", "R-precision", "share of the first R results with the query's class"),
    (
        "mean_average_precision",
        "mAP",
        "average precision of the same-class images anywhere in the searched depth, not "
        "only among the first R",
    ),
    (
        "mean_per_class_precision_at_1",
        "mean per-class precision@1",
        "precision@1 of each class, averaged: small classes weigh as much as large ones",
    ),
    (
        "book_accuracy",
        "book accuracy",
        "the book's protocol: every image queries all others by L2 distance; share of its 4 "
        "nearest with its class, averaged over all images (lone ones count as 0)",
    ),
)
VERIFICATION = (
    (
        "roc_auc",
        "ROC AUC",
        "chance that a same-class pair scores above a different-class pair",
    ),
    ("eer", "EER", "error rate at the threshold where false accepts equal false rejects"),
    (
        "tar_at_far_1e-2",
        "TAR @ FAR 1e-2",
        "share of same-class pairs accepted when 1% of different-class pairs are",
    ),
    (
        "tar_at_far_1e-3",
        "TAR @ FAR 1e-3",
        "share of same-class pairs accepted when 0.1% of different-class pairs are",
    ),
    (
        "best_threshold",
        "best threshold",
        "score that separates the pairs best (cosine similarity; for l2 a negative distance)",
    ),
    ("best_accuracy", "best accuracy", "share of pairs judged right at that threshold"),
    ("num_pairs", "pairs", "pairs drawn, half same-class and half different-class"),
)
ONE_SHOT_HELP = (
    "N-way one-shot: one image of each of N classes is the support, another image of one of "
    "them the query; share of queries whose most similar support has their class"
)
# Below these counts a figure moves in steps too coarse to compare runs by (see _reliability).
FEW_QUERIES = 200
FAR_MIN_IMPOSTORS = {"tar_at_far_1e-2": 100, "tar_at_far_1e-3": 1000}
FEW_CLASS_QUERIES = 5
# The training loop and evaluate.py write these under heldout/<key> at the global step.
HELDOUT_RETRIEVAL = (
    "r_precision",
    "map_at_r",
    "mean_average_precision",
    "mean_per_class_precision_at_1",
    "book_accuracy",
)
HELDOUT_VERIFICATION = ("roc_auc", "eer", "tar_at_far_1e-2", "tar_at_far_1e-3")
PROJECTOR_HEADER = ["class", "top1_correct", "top1_class", "file", "worst_class"]
FIGURE_TITLES = {
    "roc": "ROC curve",
    "pca": "Embedding length (PCA)",
    "tsne": "t-SNE of held-out embeddings",
    "tsne_worst": "t-SNE of the worst classes",
    "queries": "Example queries",
}


# --- formatting ---------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """Fractions with 4 decimals (as in metrics.json), integers as they are, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    return str(value)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def _cell(text: Any) -> str:
    """A Markdown table cell: a class name with `|` or a newline must not break the table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


# --- figures ------------------------------------------------------------------------------


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A figure on its own Agg canvas (see the module docstring for why not pyplot)."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def render(fig: Figure, dpi: float | None = None) -> np.ndarray:
    """The figure as an H x W x 3 uint8 array.

    `write_report` draws each figure once with this and writes those pixels both to the PNG
    and to TensorBoard: drawing is most of the report's time outside t-SNE, and one drawing
    guarantees both show the same picture.
    """
    if dpi is not None:
        fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_roc(
    fpr: Sequence[float],
    tpr: Sequence[float],
    verification: Mapping[str, Any] | None = None,
    log_x: bool = False,
) -> Figure:
    """The verification ROC curve, AUC and EER in the title.

    `log_x` spreads the low-FAR end, where a deployed threshold lives; points at FAR 0 are
    dropped then (log 0 is undefined).
    """
    fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    fig = new_figure(5, 4.5)
    ax = fig.add_subplot()
    if log_x:
        keep = fpr > 0
        fpr, tpr = fpr[keep], tpr[keep]
        ax.set_xscale("log")
    else:
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
        ax.set_xlim(0, 1)
    ax.plot(fpr, tpr, lw=2, label="ROC")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (FAR)" + (", log scale" if log_x else ""))
    ax.set_ylabel("true accept rate (TAR)")
    ver = verification or {}
    title = "ROC"
    if "roc_auc" in ver and "eer" in ver:
        title = f"ROC: AUC {ver['roc_auc']:.4f}, EER {ver['eer']:.4f}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def plot_pca(rows: Sequence[Mapping[str, Any]], shortest: int | None = None) -> Figure:
    """Quality and latency against embedding length, to pick the shortest length to ship.

    precision@1 and MAP@R share the left axis (both fractions); per-query microseconds go on
    a twin right axis. The lengths sit evenly spaced, one tick each: they are roughly powers
    of two, and on a true log axis neighbours such as 100 and 128 print over each other. The
    legend goes under the axes, where it cannot cover a curve.
    """
    rows = sorted(rows, key=lambda r: r["length"])
    lengths = [r["length"] for r in rows]
    x = np.arange(len(rows))
    fig = new_figure(6, 4.4)
    ax = fig.add_subplot()
    ax.plot(x, [r["precision_at_1"] for r in rows], "o-", label="precision@1")
    ax.plot(x, [r["map_at_r"] for r in rows], "s-", label="MAP@R")
    ax.set_xticks(x, [f"{n}\n(full)" if not r.get("pca", True) else str(n)
                      for n, r in zip(lengths, rows, strict=True)])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("embedding length (PCA fitted on the training embeddings)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    handles = ax.get_lines()
    if all("query_us" in r for r in rows):
        twin = ax.twinx()
        twin.plot(x, [r["query_us"] for r in rows], "^--", color="tab:grey", label="µs / query")
        us = [r["query_us"] for r in rows]
        if min(us) > 0 and max(us) / min(us) > 20:  # one slow length would flatten the rest
            twin.set_yscale("log")
            twin.set_ylabel("µs per single-query search (log scale)")
        else:
            twin.set_ylabel("µs per single-query search")
            twin.set_ylim(bottom=0)
        handles = [*handles, *twin.get_lines()]
    if shortest is not None and shortest in lengths:
        ax.axvline(lengths.index(shortest), color="tab:green", ls=":", lw=1.5)
        handles = [*handles, Line2D([], [], color="tab:green", ls=":",
                                    label=f"shortest within 0.5 points ({shortest})")]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncols=2,
               fontsize=8, frameon=False)
    ax.set_title("Retrieval quality and latency vs embedding length")
    return fig


def sample_rows(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a seeded uniform sample: the same rows on every checkpoint of the
    same data, so two reports compare like for like."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, max_points, replace=False))


def tsne_2d(emb: np.ndarray, seed: int = 0, n_jobs: int = 2) -> np.ndarray:
    """2-D t-SNE of `emb` (rows are points), L2-normalised then PCA'd to 50 dimensions.

    Normalising matches the cosine geometry the models are trained and searched with (a no-op
    for already normalised embeddings); PCA to 50 first is the usual speed-up with no visible
    change, and brings 3000 x 1280 points down to ~20 s on 2 (busy) cores.
    """
    x = np.asarray(emb, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n, dim = x.shape
    if n < 4:
        raise DataError(f"t-SNE needs at least 4 points, got {n}")
    if dim > TSNE_PCA_DIMS and n > TSNE_PCA_DIMS:
        x = PCA(TSNE_PCA_DIMS, random_state=seed).fit_transform(x).astype(np.float32)
    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (n - 1) / 3),
        init="pca",
        max_iter=TSNE_MAX_ITER,
        random_state=seed,
        n_jobs=n_jobs,
    )
    return tsne.fit_transform(x)


def class_colours(n: int) -> np.ndarray:
    """n RGBA colours: qualitative palettes while they last, then a continuous map."""
    if n <= 10:
        return matplotlib.colormaps["tab10"](np.arange(n))
    if n <= 20:
        return matplotlib.colormaps["tab20"](np.arange(n))
    return matplotlib.colormaps["turbo"](np.linspace(0, 1, n))


def plot_tsne(
    emb: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    max_points: int = 3000,
    seed: int = 0,
    keep_classes: Sequence[str] | None = None,
    title: str = "t-SNE of held-out embeddings",
    highlight: Sequence[str] = (),
    highlight_title: str = "worst classes",
) -> Figure:
    """t-SNE scatter of at most `max_points` seeded-sampled points.

    `keep_classes` (names) restricts the plot to those classes, e.g. the worst ones, which
    a full plot drowns. Up to 20 classes get a colour each and a legend. Beyond that colours
    no longer tell classes apart (and a 101-entry legend covers the plot), so every point is
    grey, each class name is printed at the median of its points, and only the `highlight`
    classes (e.g. the worst, at most 10) are coloured, with a legend.
    """
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    if keep_classes is not None:
        keep = set(keep_classes)
        rows = rows[np.isin(labels, [i for i, name in enumerate(class_names) if name in keep])]
    rows = rows[sample_rows(len(rows), max_points, seed)]
    xy = tsne_2d(np.asarray(emb)[rows], seed)
    sampled = labels[rows]
    present = np.unique(sampled)
    many = len(present) > LEGEND_MAX_CLASSES
    names = {int(c): class_name(c, class_names) for c in present}
    coloured = [c for c in present if names[int(c)] in set(highlight)] if many else list(present)
    colours = dict(zip(coloured, class_colours(len(coloured)), strict=True))
    fig = new_figure(7.5, 6)
    ax = fig.add_subplot()
    size = 6 if len(rows) > 1000 else 14
    if many:
        grey = ~np.isin(sampled, coloured)
        ax.scatter(xy[grey, 0], xy[grey, 1], s=size, color="0.75", alpha=0.6, linewidths=0)
    for label, colour in colours.items():
        sel = sampled == label
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size * (2 if many else 1), color=colour,
                   alpha=0.9, linewidths=0, label=names[int(label)])
    if many:
        for label in present:
            centre = np.median(xy[sampled == label], axis=0)
            hot = label in colours
            ax.annotate(_short(names[int(label)], 14), centre, fontsize=6 if hot else 5,
                        ha="center", va="center", color="black" if hot else "0.35",
                        fontweight="bold" if hot else "normal")
    if colours:
        heading = highlight_title if many else None
        ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False, title=heading, title_fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({len(rows)} points, {len(present)} classes)", fontsize=10)
    return fig


def thumbnail(path: str | Path, size: int) -> np.ndarray:
    """`size` x `size` RGB uint8 of the whole image, padded white to a square.

    An image that no longer decodes becomes a grey tile: the metrics are already computed,
    and one moved file must not cost the whole report.
    """
    try:
        img = Image.fromarray(load_image(path, size_hint=size))
    except DataError:
        return np.full((size, size, 3), MISSING_GREY, dtype=np.uint8)
    padded = ImageOps.pad(img, (size, size), Image.Resampling.BILINEAR, color=(255, 255, 255))
    return np.asarray(padded, dtype=np.uint8)


def outline(tile: np.ndarray, colour: Sequence[int], width: int) -> np.ndarray:
    """A copy of `tile` with a `width`-pixel frame of `colour` painted into its pixels, so the
    colour survives any viewer (a matplotlib spine would not be in the saved image array)."""
    out = tile.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = colour, colour, colour, colour
    return out


def select_queries(neighbours: Any, n: int = 8, seed: int = 0) -> np.ndarray:
    """Up to n scored query rows: first up to n // 2 whose top result is wrong, then ones
    whose top result is right (either side fills in when the other runs short).

    Failures show what the model confuses; successes show what "right" looks like.
    Lone queries (no correct answer exists) are never shown.
    """
    scored, right = _top1_right(neighbours)
    rng = np.random.default_rng(seed)
    wrong_rows = rng.permutation(scored[~right])
    right_rows = rng.permutation(scored[right])
    n_wrong = min(len(wrong_rows), max(n // 2, n - len(right_rows)))
    n_right = min(len(right_rows), n - n_wrong)
    return np.concatenate([np.sort(wrong_rows[:n_wrong]), np.sort(right_rows[:n_right])])


def _top1_right(neighbours: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scored query rows, whether each one's top result has its class)."""
    scored = np.flatnonzero(np.asarray(neighbours.scored))
    top = np.asarray(neighbours.labels)[scored, 0]
    valid = np.asarray(neighbours.indices)[scored, 0] >= 0
    return scored, (top == np.asarray(neighbours.query_labels)[scored]) & valid


def queries_note(neighbours: Any, rows: Sequence[int], seed: int) -> str:
    """How the grid's queries were chosen, in one sentence (under the grid, in report.md)."""
    scored, right = _top1_right(neighbours)
    shown_wrong = int(np.isin(rows, scored[~right]).sum())
    return (
        f"{shown_wrong} queries drawn at random (seed {seed}) from the {int((~right).sum())} "
        f"whose top result is wrong, then {len(rows) - shown_wrong} from the "
        f"{int(right.sum())} whose top result is right, of {len(scored)} scored queries."
    )


def query_grid(
    neighbours: Any,
    query_paths: Sequence[str | Path],
    gallery_paths: Sequence[str | Path],
    class_names: Sequence[str],
    queries: Sequence[int] | None = None,
    top: int = 5,
    thumb: int = 96,
    seed: int = 0,
    n: int = 8,
    metric: str = "cosine",
) -> Figure:
    """One row per query: its image, then its top results outlined green (same class) or red,
    each titled with its rank, class and search score, with its file name underneath.

    `queries` are query rows (default `select_queries`, `n` of them); results come from the
    neighbours the metrics kept, so nothing is searched again. The footer says how the
    queries were chosen, so a grid of failures is not read as typical.
    """
    chosen = queries is None
    rows = select_queries(neighbours, n=n, seed=seed) if chosen else np.asarray(queries)
    top = min(top, np.asarray(neighbours.indices).shape[1])
    border = max(2, thumb // 24)
    height = 1.75 * max(len(rows), 1) + 1.0
    # A fixed layout: constrained layout costs more than the 50 images it arranges.
    fig = new_figure(1.35 * (top + 1), height, layout=None)
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.65 / height, top=1 - 0.75 / height, wspace=0.1,
        hspace=0.55,
    )
    axes = fig.subplots(max(len(rows), 1), top + 1, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, q in enumerate(rows):
        truth = neighbours.query_labels[q]
        axes[r, 0].imshow(thumbnail(query_paths[q], thumb), interpolation="nearest")
        axes[r, 0].set_title(
            f"query: {_short(class_name(truth, class_names))}", fontsize=7, fontweight="bold"
        )
        _file_label(axes[r, 0], query_paths[q])
        for j in range(top):
            idx, label = int(neighbours.indices[q, j]), neighbours.labels[q, j]
            hit = idx >= 0 and label == truth
            ax = axes[r, j + 1]
            if idx < 0:
                ax.imshow(np.full((thumb, thumb, 3), MISSING_GREY, np.uint8))
                ax.set_title(f"{j + 1}. (none)", fontsize=7, color=np.asarray(RED) / 255)
                continue
            tile = thumbnail(gallery_paths[idx], thumb)
            ax.imshow(outline(tile, GREEN if hit else RED, border), interpolation="nearest")
            name = _short(class_name(label, class_names))
            ax.set_title(
                f"{j + 1}. {name}\n{float(neighbours.scores[q, j]):.3f}",
                fontsize=7,
                color=np.asarray(GREEN if hit else RED) / 255,
            )
            _file_label(ax, gallery_paths[idx])
    score = (
        "cosine similarity, higher = closer"
        if metric == "cosine"
        else "squared L2 distance, lower = closer"
    )
    fig.suptitle(
        f"Example queries and their top results (green: same class, red: other; {score})",
        fontsize=8,
        y=1 - 0.1 / height,
        va="top",
    )
    if chosen and len(rows):
        fig.text(0.5, 0.1 / height, f"Shown: {queries_note(neighbours, rows, seed)}", fontsize=7,
                 ha="center", va="bottom", wrap=True)
    return fig


def _file_label(ax: Any, path: str | Path) -> None:
    ax.text(0.5, -0.03, _short(Path(path).name, 22), transform=ax.transAxes, fontsize=5,
            ha="center", va="top", color="0.3")


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


# --- TensorBoard --------------------------------------------------------------------------


def heldout_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline held-out metrics as TensorBoard tags heldout/<key>: precision@k and
    recall@k, the R-based scores, mean per-class precision@1, the book score and the
    verification figures (from `metrics["verification"]`, or flat keys as the training loop
    keeps them).

    The training loop and evaluate.py both write these tags at the global optimizer step, so
    an evaluated checkpoint is a point on its training curve. Counts, sizes and timings are
    not curves: they go to `diagnostics_markdown`.
    """
    out = {
        f"heldout/{k}": float(v)
        for k, v in metrics.items()
        if _is_scalar(v)
        and (k.startswith(("precision_at_", "recall_at_")) or k in HELDOUT_RETRIEVAL)
    }
    ver = {**metrics, **(metrics.get("verification") or {})}
    for k in HELDOUT_VERIFICATION:
        if _is_scalar(ver.get(k)):
            out[f"heldout/{k}"] = float(ver[k])
    return out


def diagnostics_markdown(metrics: Mapping[str, Any], timing: Mapping[str, float]) -> str:
    """Sizes, counts, timings, one-shot, the PCA sweep and the index comparison as Markdown
    tables for TensorBoard's Text tab: single numbers that would each be a one-dot chart."""
    counts = [
        (key.replace("_", " "), _fmt(metrics[key]))
        for key in ("num_queries", "num_lone_queries", "embedding_dim", "search_k")
        if key in metrics
    ]
    ver = metrics.get("verification") or {}
    if "num_pairs" in ver:
        counts.append(("verification pairs", _fmt(ver["num_pairs"])))
    lines = ["## Counts", "", *_table(["what", "value"], counts), ""] if counts else []
    lines += _verification_section({"one_shot": metrics.get("one_shot") or {}})
    lines += _pca_section(metrics) + _index_section(metrics)
    lines += _timing_section(metrics, timing)
    return "\n".join(lines)


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys with values the hparams plugin stores: numbers, strings
    and booleans as they are, None as "none", lists as their text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}."))
        elif value is None:
            out[name] = "none"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def add_hparams(
    writer: SummaryWriter,
    config: Mapping[str, Any],
    metric_tags: Sequence[str],
    step: int = 0,
    finished: bool = False,
) -> None:
    """The hparams plugin's summaries in `writer`'s own run: the flattened config, and
    `metric_tags` (scalar tags of this run) as the metrics the HParams tab shows for it.

    `SummaryWriter.add_hparams` would write into a new sub-folder, i.e. a second run next to
    the training curves; the plugin's summary protos (torch's `summary.hparams`) written to
    this run keep the table and the curves together. `finished` adds the session's end.
    """
    experiment, start, end = hparams(flat_hparams(config), dict.fromkeys(metric_tags, 0.0))
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
            add_hparams(writer, config, sorted(scalars), step, finished=True)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        for name, image in images.items():
            if isinstance(image, Figure):
                image = render(image, FIGURE_DPI)
            writer.add_image(f"report/{name}", image, step, dataformats="HWC")
        for tag, text in (texts or {}).items():
            writer.add_text(tag, text, step)
        if pairs is not None:
            add_pr_curve(writer, "heldout/verification_pr", *pairs, step)
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


def worst_below_mean(metrics: Mapping[str, Any], n: int = WORST_CLASSES) -> list[tuple[str, float]]:
    """The worst classes (`metrics["worst_classes"]`) that score below the mean per-class
    precision@1: a class at 1.0 is never "worst", even when every class is at 1.0."""
    mean = metrics.get("mean_per_class_precision_at_1")
    worst = list(metrics.get("worst_classes") or [])
    if mean is None:
        return worst[:n]
    return [(name, p1) for name, p1 in worst if p1 < mean][:n]


# --- Markdown -----------------------------------------------------------------------------


def _headline_section(m: Mapping[str, Any]) -> list[str]:
    rows = [(label, _fmt(m[key]), help) for key, label, help in HEADLINE if key in m]
    lines = ["## Retrieval", "", *_table(["metric", "value", "what it measures"], rows), ""]
    if "num_queries" in m:
        lone = m.get("num_lone_queries") or 0
        extra = f" ({lone} lone queries left out)" if lone else ""
        lines += [
            f"{m['num_queries']} scored queries{extra}, embedding dimension "
            f"{m.get('embedding_dim', 'n/a')}. A query searches the other held-out images "
            "(leave-one-out) unless the gallery is the training set.",
            "",
        ]
    return lines


def _verification_section(m: Mapping[str, Any]) -> list[str]:
    lines = []
    ver = m.get("verification") or {}
    if ver:
        rows = [(label, _fmt(ver[key]), help) for key, label, help in VERIFICATION if key in ver]
        lines += [
            "## Verification",
            "",
            *_table(["metric", "value", "what it measures"], rows),
            "",
        ]
    shots = m.get("one_shot") or {}
    if shots:
        rows = [
            (f"{n}-way", _fmt(acc) if acc is not None else "n/a (too few classes)")
            for n, acc in sorted(shots.items(), key=lambda kv: int(kv[0]))
        ]
        lines += ["## One-shot", "", *_table(["episode", "accuracy"], rows), "", ONE_SHOT_HELP
                  + ".", ""]
    return lines


def _classes_section(m: Mapping[str, Any]) -> list[str]:
    lines = []
    per_class = m.get("per_class") or {}
    worst = worst_below_mean(m)
    mean = m.get("mean_per_class_precision_at_1")
    if worst:
        rows = [
            (name, _fmt(p1), per_class.get(name, {}).get("num_queries", "n/a"))
            for name, p1 in worst
        ]
        lines += [
            f"## Worst {len(worst)} classes",
            "",
            *_table(["class", "precision@1", "queries"], rows),
            "",
        ]
        if mean is not None:
            lines += [f"Classes below the mean per-class precision@1 ({_fmt(mean)}), "
                      f"lowest first, at most {WORST_CLASSES}.", ""]
    elif m.get("worst_classes"):
        lines += ["## Worst classes", "", "No class is below the mean per-class precision@1 "
                  f"({_fmt(mean)}): every class scores the same.", ""]
    if "confused_pairs" in m:
        pairs = m["confused_pairs"]
        lines += [f"## Most confused pairs (top-1, {len(pairs)} shown)", ""]
        lines += (
            _table(["true class", "retrieved class", "count"], pairs)
            if pairs
            else ["No top-1 mistakes."]
        )
        lines.append("")
    return lines


def _pca_section(m: Mapping[str, Any]) -> list[str]:
    pca = m.get("pca") or {}
    if not pca:
        return []
    rows = sorted(pca.values(), key=lambda r: r["length"])
    table = [
        (
            r["length"],
            "yes" if r.get("pca") else "no (full)",
            _fmt(r.get("precision_at_1")),
            _fmt(r.get("map_at_r")),
            _fmt(r.get("book_accuracy")),
            f"{r['query_us']:.1f}" if "query_us" in r else "n/a",
            _size(r.get("index_bytes", r.get("bytes", 0))),
        )
        for r in rows
    ]
    lines = [
        "## Embedding length (PCA)",
        "",
        *_table(
            ["length", "PCA", "precision@1", "MAP@R", "book accuracy", "µs/query", "index size"],
            table,
        ),
        "",
    ]
    if "pca_shortest_within_0.5" in m:
        lines += [
            f"The shortest length within 0.5 points of full-length precision@1: "
            f"{m['pca_shortest_within_0.5']} (full length {rows[-1]['length']}).",
            "",
        ]
    full = rows[-1]
    better = [r for r in rows[:-1] if r.get("precision_at_1", 0) > full.get("precision_at_1", 1)]
    if better:
        best = max(better, key=lambda r: r["precision_at_1"])
        lines += [
            f"PCA to {best['length']} scores above the full length (precision@1 "
            f"{_fmt(best['precision_at_1'])} against {_fmt(full['precision_at_1'])}): dropping "
            "low-variance directions removes features that vary within classes. The PCA is "
            "fitted on the training embeddings (with `data.split: none` those are the "
            "evaluated images, and part of the gain may be fitting them); check that the gap "
            "exceeds the noise (see above) before relying on it.",
            "",
        ]
    return lines


def _index_section(m: Mapping[str, Any]) -> list[str]:
    indexes = m.get("indexes") or []
    if not indexes:
        return []
    rows = [
        (
            r["kind"],
            _fmt(r["precision_at_1"]),
            _fmt(r["map_at_r"]),
            f"{r['build_seconds']:.3f}",
            f"{r['query_us']:.1f}",
            _size(r["bytes"]),
        )
        for r in indexes
    ]
    return [
        "## Index comparison",
        "",
        *_table(["index", "precision@1", "MAP@R", "build s", "µs/query", "size"], rows),
        "",
        *_above_exact(indexes),
    ]


def _above_exact(indexes: Sequence[Mapping[str, Any]]) -> list[str]:
    """A comment for each approximate index that scores above exact (flat) search: readers
    otherwise take it for a better index."""
    exact = next((r for r in indexes if r["kind"] == "flat"), None)
    if exact is None:
        return []
    lines = []
    for r in indexes:
        above = [
            f"{label} {_fmt(r[key])} against {_fmt(exact[key])}"
            for key, label in (("precision_at_1", "precision@1"), ("map_at_r", "MAP@R"))
            if r["kind"] != "flat" and r[key] > exact[key] + 1e-9
        ]
        if above:
            lines.append(
                f"{r['kind']} scores above exact search ({'; '.join(above)}). It does not find "
                "the true nearest neighbours better: it ranks by approximate distances, and its "
                "coarse clusters (and PQ codebooks) were trained on these same held-out "
                "embeddings, so they follow their classes and happen to rank more same-class "
                "images first. Expect exact search or better on images the index was not "
                "trained on; compare on a larger gallery before shipping it for its score."
            )
    return lines + [""] if lines else []


def _timing_section(m: Mapping[str, Any], extra: Mapping[str, float]) -> list[str]:
    timing = {**(m.get("timing") or {}), **extra}
    if not timing:
        return []
    rows = [(k.removesuffix("_seconds").replace("_", " "), f"{v:.2f}") for k, v in timing.items()]
    return ["## Timing", "", *_table(["step", "seconds"], rows), ""]


def _reliability(m: Mapping[str, Any], heldout_labels: np.ndarray | None = None) -> list[str]:
    """What the amount of data makes too coarse to read closely, each with its reason."""
    out = []
    n = m.get("num_queries")
    if n:
        p1 = float(m.get("precision_at_1", 0.0))
        se = (p1 * (1 - p1) / n) ** 0.5
        line = (
            f"{n} scored queries: one query moves precision@1 by {1 / n:.4f}, and its "
            f"standard error is about {se:.4f}"
        )
        if n < FEW_QUERIES:
            line += "; differences between runs smaller than twice that are noise"
        out.append(line + ".")
    ver = m.get("verification") or {}
    pairs = ver.get("num_pairs")
    if pairs:
        impostors = int(ver.get("num_impostor_pairs", pairs - pairs // 2))
        for key, need in FAR_MIN_IMPOSTORS.items():
            if key in ver and impostors < need:
                out.append(
                    f"{key.replace('tar_at_far_', 'TAR @ FAR ')} is not resolved: it needs at "
                    f"least {need} different-class pairs (one false accept in {need}), there "
                    f"are {impostors}."
                )
        if heldout_labels is not None:
            _, counts = np.unique(np.asarray(heldout_labels), return_counts=True)
            genuine = int((counts * (counts - 1) // 2).sum())
            impostor = int((len(heldout_labels) ** 2 - (counts**2).sum()) // 2)
            if pairs // 2 > genuine or pairs - pairs // 2 > impostor:
                out.append(
                    f"The {pairs} verification pairs are drawn with replacement from only "
                    f"{genuine} distinct same-class and {impostor} distinct different-class "
                    "pairs: repeats add no information."
                )
    per_class = m.get("per_class") or {}
    few = [k for k, v in per_class.items() if v.get("num_queries", 0) < FEW_CLASS_QUERIES]
    if few:
        step = 1 / (FEW_CLASS_QUERIES - 1)
        out.append(
            f"{len(few)} of {len(per_class)} classes have fewer than {FEW_CLASS_QUERIES} "
            f"queries: their per-class precision@1 moves in steps of {step:.2f} or more, so "
            "the worst-class list is partly chance."
        )
    return out


def markdown_report(
    metrics: Mapping[str, Any],
    figures: Sequence[str] = (),
    notes: Sequence[str] = (),
    timing: Mapping[str, float] | None = None,
    heldout_labels: np.ndarray | None = None,
) -> str:
    """The report as Markdown: one page that answers "how good, where does it fail, what to
    ship". `figures` are PNG file names next to it; `notes` say what was skipped and why (the
    evaluator's `metrics["notes"]` come first); `timing` adds the report's own steps to the
    evaluation timing; `heldout_labels` let the reliability section count distinct pairs."""
    lines = ["# Evaluation report", ""]
    if metrics.get("source"):
        lines += [f"Source: `{metrics['source']}`", ""]
    lines += _headline_section(metrics)
    lines += _verification_section(metrics)
    reliability = _reliability(metrics, heldout_labels)
    if reliability:
        lines += ["## How far to trust these numbers", "", *[f"- {r}" for r in reliability], ""]
    lines += _classes_section(metrics)
    lines += _pca_section(metrics)
    lines += _index_section(metrics)
    lines += _timing_section(metrics, timing or {})
    if figures:
        lines += ["## Figures", ""]
        for name in figures:
            title = FIGURE_TITLES.get(Path(name).stem, Path(name).stem)
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    notes = [*(metrics.get("notes") or []), *notes]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


# --- the whole report ---------------------------------------------------------------------


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
) -> None:
    """Write report.md, roc/pca/tsne/tsne_worst/queries PNGs and TensorBoard events to out_dir.

    `result` is an `mltrain.evaluation.evaluate.EvalResult`. `gallery_paths` are the images the
    neighbour rows point at; the default, the held-out paths, is right for leave-one-out
    evaluation. t-SNE pictures are skipped with `tsne=False` (they dominate the run time);
    the same `seed` samples the same points, so reports of two checkpoints compare directly.
    `step` is the checkpoint's global optimizer step: the held-out scalars land on the
    training curves (see `write_tensorboard`); `config` (a config as a dict) goes to the
    HParams tab; `metric` names the search score on the query grid and the PR curve's pairs.
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
        log_x = ver.get("num_pairs", 0) >= LOG_ROC_MIN_PAIRS
        figures["roc"] = plot_roc(curves["fpr"], curves["tpr"], ver, log_x=log_x)
    if m.get("pca"):
        figures["pca"] = plot_pca(list(m["pca"].values()), m.get("pca_shortest_within_0.5"))
    if tsne:
        start = time.perf_counter()
        figures.update(_tsne_figures(split, m, tsne_max_points, seed, notes))
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
    text = markdown_report(
        m, [f"{name}.png" for name in figures], notes, timing, split.heldout_labels
    )
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    pairs = None
    if ver.get("num_pairs"):
        pairs = verification_pairs(
            split.heldout_emb, split.heldout_labels, metric, int(ver["num_pairs"]), seed
        )
    # TensorBoard shows the figures in its Images tab; relative image links would be broken.
    text_only = markdown_report(m, (), notes, timing, split.heldout_labels)
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
    split: Any, m: Mapping[str, Any], max_points: int, seed: int, notes: list[str]
) -> dict[str, Figure]:
    figures = {}
    if len(split.heldout_labels) < 4:
        notes.append("No t-SNE: fewer than 4 held-out embeddings.")
        return figures
    worst = [name for name, _ in worst_below_mean(m)]
    figures["tsne"] = plot_tsne(
        split.heldout_emb, split.heldout_labels, split.classes, max_points, seed, highlight=worst
    )
    ids = [i for i, name in enumerate(split.classes) if name in set(worst)]
    if not worst:
        notes.append("No worst-class t-SNE: no class is below the mean per-class precision@1.")
    elif int(np.isin(split.heldout_labels, ids).sum()) >= 4:
        figures["tsne_worst"] = plot_tsne(
            split.heldout_emb,
            split.heldout_labels,
            split.classes,
            max_points,
            seed,
            keep_classes=worst,
            title=f"t-SNE of the {len(worst)} worst classes",
        )
    else:
        notes.append("No worst-class t-SNE: the worst classes have fewer than 4 embeddings.")
    return figures
