"""The evaluation report: TensorBoard events, PNG figures and a Markdown summary.

`write_report` turns an `mltrain.evaluation.EvalResult` into files a person reads: numbers
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
from PIL import Image, ImageOps
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from torch.utils.tensorboard import SummaryWriter

from mltrain.data.images import load_image
from mltrain.errors import DataError
from mltrain.metrics import class_name

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

HEADLINE = (
    ("precision_at_1", "precision@1"),
    ("precision_at_5", "precision@5"),
    ("precision_at_10", "precision@10"),
    ("recall_at_5", "recall@5"),
    ("map_at_r", "MAP@R"),
    ("r_precision", "R-precision"),
    ("mean_per_class_precision_at_1", "mean per-class precision@1"),
    ("book_accuracy", "book accuracy"),
)
VERIFICATION = (
    ("roc_auc", "ROC AUC"),
    ("eer", "EER"),
    ("tar_at_far_1e-2", "TAR @ FAR 1e-2"),
    ("tar_at_far_1e-3", "TAR @ FAR 1e-3"),
    ("best_threshold", "best threshold"),
    ("best_accuracy", "best accuracy"),
    ("num_pairs", "pairs"),
)
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
    a twin right axis. x is log 2 because lengths are powers of two or close to them.
    """
    rows = sorted(rows, key=lambda r: r["length"])
    x = [r["length"] for r in rows]
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(x, [r["precision_at_1"] for r in rows], "o-", label="precision@1")
    ax.plot(x, [r["map_at_r"] for r in rows], "s-", label="MAP@R")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(n) for n in x])
    ax.minorticks_off()
    ax.set_xlabel("embedding length")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    handles = ax.get_lines()
    if all("query_us" in r for r in rows):
        twin = ax.twinx()
        twin.plot(x, [r["query_us"] for r in rows], "^--", color="tab:grey", label="µs / query")
        twin.set_ylabel("µs per single-query search")
        twin.set_ylim(bottom=0)
        handles = [*handles, *twin.get_lines()]
    if shortest is not None:
        ax.axvline(shortest, color="tab:green", ls=":", lw=1)
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right")
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
) -> Figure:
    """t-SNE scatter coloured by class, of at most `max_points` seeded-sampled points.

    `keep_classes` (names) restricts the plot to those classes, e.g. the worst ones, which
    a full plot drowns. A legend only with <= 20 classes: beyond that it covers the plot and
    colours are no longer distinguishable anyway.
    """
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    if keep_classes is not None:
        keep = set(keep_classes)
        rows = rows[np.isin(labels, [i for i, name in enumerate(class_names) if name in keep])]
    rows = rows[sample_rows(len(rows), max_points, seed)]
    xy = tsne_2d(np.asarray(emb)[rows], seed)
    present = np.unique(labels[rows])
    colours = class_colours(len(present))
    fig = new_figure(7, 6)
    ax = fig.add_subplot()
    size = 6 if len(rows) > 1000 else 14
    for colour, label in zip(colours, present, strict=True):
        sel = labels[rows] == label
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            s=size,
            color=colour,
            alpha=0.8,
            linewidths=0,
            label=class_name(label, class_names),
        )
    if len(present) <= LEGEND_MAX_CLASSES:
        ax.legend(
            fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({len(rows)} points, {len(present)} classes)")
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
    scored = np.flatnonzero(np.asarray(neighbours.scored))
    top = np.asarray(neighbours.labels)[scored, 0]
    valid = np.asarray(neighbours.indices)[scored, 0] >= 0
    right = (top == np.asarray(neighbours.query_labels)[scored]) & valid
    rng = np.random.default_rng(seed)
    wrong_rows = rng.permutation(scored[~right])
    right_rows = rng.permutation(scored[right])
    n_wrong = min(len(wrong_rows), max(n // 2, n - len(right_rows)))
    n_right = min(len(right_rows), n - n_wrong)
    return np.concatenate([np.sort(wrong_rows[:n_wrong]), np.sort(right_rows[:n_right])])


def query_grid(
    neighbours: Any,
    query_paths: Sequence[str | Path],
    gallery_paths: Sequence[str | Path],
    class_names: Sequence[str],
    queries: Sequence[int] | None = None,
    top: int = 5,
    thumb: int = 96,
    seed: int = 0,
) -> Figure:
    """One row per query: its image, then its top results outlined green (same class) or red.

    `queries` are query rows (default `select_queries`); results come from the neighbours the
    metrics kept, so nothing is searched again. Class names are small titles.
    """
    rows = select_queries(neighbours, seed=seed) if queries is None else np.asarray(queries)
    top = min(top, np.asarray(neighbours.indices).shape[1])
    border = max(2, thumb // 24)
    height = 1.45 * max(len(rows), 1) + 0.45
    # A fixed layout: constrained layout costs more than the 50 images it arranges.
    fig = new_figure(1.3 * (top + 1), height, layout=None)
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / height, wspace=0.08, hspace=0.3
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
        for j in range(top):
            idx, label = int(neighbours.indices[q, j]), neighbours.labels[q, j]
            hit = idx >= 0 and label == truth
            tile = (
                thumbnail(gallery_paths[idx], thumb)
                if idx >= 0
                else np.full((thumb, thumb, 3), MISSING_GREY, np.uint8)
            )
            ax = axes[r, j + 1]
            ax.imshow(outline(tile, GREEN if hit else RED, border), interpolation="nearest")
            name = _short(class_name(label, class_names)) if idx >= 0 else "(none)"
            ax.set_title(
                f"{j + 1}. {name}", fontsize=7, color=np.asarray(GREEN if hit else RED) / 255
            )
    fig.suptitle(
        "Example queries and their top results (green: same class, red: other)",
        fontsize=9,
        y=1 - 0.1 / height,
        va="top",
    )
    return fig


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


# --- TensorBoard --------------------------------------------------------------------------


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every scalar of `metrics` as a TensorBoard tag: flat keys as eval/<key>, verification as
    eval/verification/<key>, one-shot as eval/one_shot/<n>_way (None, i.e. too few classes,
    is left out), timing as eval/timing/<key>, index rows as eval/index/<kind>/<key>.

    Per-class numbers stay out: hundreds of tags bury the ones people compare across runs.
    """
    out = {f"eval/{k}": float(v) for k, v in metrics.items() if _is_scalar(v)}
    for k, v in (metrics.get("verification") or {}).items():
        if _is_scalar(v):
            out[f"eval/verification/{k}"] = float(v)
    for n, v in (metrics.get("one_shot") or {}).items():
        if _is_scalar(v):
            out[f"eval/one_shot/{n}_way"] = float(v)
    for k, v in (metrics.get("timing") or {}).items():
        if _is_scalar(v):
            out[f"eval/timing/{k}"] = float(v)
    for row in metrics.get("indexes") or []:
        for k, v in row.items():
            if k != "kind" and _is_scalar(v):
                out[f"eval/index/{row['kind']}/{k}"] = float(v)
    return out


def pca_scalars(metrics: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(tag, value, step) per PCA row and field, the length as step: TensorBoard then draws
    each field as a curve over length."""
    out = []
    for row in sorted((metrics.get("pca") or {}).values(), key=lambda r: r["length"]):
        for k, v in row.items():
            if k != "length" and _is_scalar(v):
                out.append((f"pca/{k}", float(v), int(row["length"])))
    return out


def _tsv_safe(name: str) -> str:
    """The projector's metadata is one TSV line per point; tabs or newlines would shift rows."""
    return " ".join(str(name).split()) or "?"


def add_projector(
    writer: SummaryWriter,
    emb: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    paths: Sequence[str | Path],
    max_points: int = PROJECTOR_MAX_POINTS,
    seed: int = 0,
) -> int:
    """Held-out embeddings in TensorBoard's projector, with class names and 32 x 32 thumbnails,
    for at most `max_points` seeded-sampled points; returns how many.

    The cap keeps the sprite one readable image and the projector's text tensor file small
    (it writes every float as text: 10k x 1280 would be ~150 MB).
    """
    rows = sample_rows(len(labels), max_points, seed)
    images = np.stack([thumbnail(paths[i], SPRITE_SIZE) for i in rows])
    label_img = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    metadata = [_tsv_safe(class_name(labels[i], class_names)) for i in rows]
    writer.add_embedding(
        np.asarray(emb)[rows], metadata=metadata, label_img=label_img, tag="heldout"
    )
    return len(rows)


def write_tensorboard(
    out_dir: Path,
    metrics: Mapping[str, Any],
    images: Mapping[str, np.ndarray | Figure],
    split: Any | None = None,
    seed: int = 0,
) -> None:
    """Scalars, figures under report/<name> (rendered H x W x 3 arrays, or figures that
    `add_figure` renders) and, given the split, the projector."""
    with SummaryWriter(str(out_dir)) as writer:
        for tag, value in scalar_metrics(metrics).items():
            writer.add_scalar(tag, value, 0)
        for tag, value, step in pca_scalars(metrics):
            writer.add_scalar(tag, value, step)
        for name, image in images.items():
            if isinstance(image, Figure):
                writer.add_figure(f"report/{name}", image, 0, close=False)
            else:
                writer.add_image(f"report/{name}", image, 0, dataformats="HWC")
        if split is not None and len(split.heldout_paths) == len(split.heldout_labels):
            add_projector(
                writer,
                split.heldout_emb,
                split.heldout_labels,
                split.classes,
                split.heldout_paths,
                seed=seed,
            )


# --- Markdown -----------------------------------------------------------------------------


def _headline_section(m: Mapping[str, Any]) -> list[str]:
    rows = [(label, _fmt(m[key])) for key, label in HEADLINE if key in m]
    lines = ["## Retrieval", "", *_table(["metric", "value"], rows), ""]
    if "num_queries" in m:
        lone = m.get("num_lone_queries") or 0
        extra = f" ({lone} lone queries left out)" if lone else ""
        lines += [
            f"{m['num_queries']} scored queries{extra}, embedding dimension "
            f"{m.get('embedding_dim', 'n/a')}.",
            "",
        ]
    return lines


def _verification_section(m: Mapping[str, Any]) -> list[str]:
    lines = []
    ver = m.get("verification") or {}
    if ver:
        rows = [(label, _fmt(ver[key])) for key, label in VERIFICATION if key in ver]
        lines += ["## Verification", "", *_table(["metric", "value"], rows), ""]
    shots = m.get("one_shot") or {}
    if shots:
        rows = [
            (f"{n}-way", _fmt(acc) if acc is not None else "n/a (too few classes)")
            for n, acc in sorted(shots.items(), key=lambda kv: int(kv[0]))
        ]
        lines += ["## One-shot", "", *_table(["episode", "accuracy"], rows), ""]
    return lines


def _classes_section(m: Mapping[str, Any]) -> list[str]:
    lines = []
    per_class = m.get("per_class") or {}
    worst = m.get("worst_classes") or []
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
    ]


def _timing_section(m: Mapping[str, Any], extra: Mapping[str, float]) -> list[str]:
    timing = {**(m.get("timing") or {}), **extra}
    if not timing:
        return []
    rows = [(k.removesuffix("_seconds").replace("_", " "), f"{v:.2f}") for k, v in timing.items()]
    return ["## Timing", "", *_table(["step", "seconds"], rows), ""]


def markdown_report(
    metrics: Mapping[str, Any],
    figures: Sequence[str] = (),
    notes: Sequence[str] = (),
    timing: Mapping[str, float] | None = None,
) -> str:
    """The report as Markdown: one page that answers "how good, where does it fail, what to
    ship". `figures` are PNG file names next to it; `notes` say what was skipped and why;
    `timing` adds the report's own steps to the evaluation timing."""
    lines = ["# Evaluation report", ""]
    if metrics.get("source"):
        lines += [f"Source: `{metrics['source']}`", ""]
    lines += _headline_section(metrics)
    lines += _verification_section(metrics)
    lines += _classes_section(metrics)
    lines += _pca_section(metrics)
    lines += _index_section(metrics)
    lines += _timing_section(metrics, timing or {})
    if figures:
        lines += ["## Figures", ""]
        for name in figures:
            title = FIGURE_TITLES.get(Path(name).stem, Path(name).stem)
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
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
) -> None:
    """Write report.md, roc/pca/tsne/tsne_worst/queries PNGs and TensorBoard events to out_dir.

    `result` is an `mltrain.evaluation.EvalResult`. `gallery_paths` are the images the
    neighbour rows point at; the default, the held-out paths, is right for leave-one-out
    evaluation. t-SNE pictures are skipped with `tsne=False` (they dominate the run time);
    the same `seed` samples the same points, so reports of two checkpoints compare directly.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m, split = result.metrics, result.split
    figures: dict[str, Figure] = {}
    notes: list[str] = list(m.get("notes") or [])  # the data's and the plan's, then figures'
    timing: dict[str, float] = {}
    curves = result.curves or {}
    if curves.get("fpr") and curves.get("tpr"):
        ver = m.get("verification") or {}
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
                result.neighbours, split.heldout_paths, paths, split.classes, seed=seed
            )
    images = {name: render(fig, FIGURE_DPI) for name, fig in figures.items()}
    for name, image in images.items():
        Image.fromarray(image).save(out_dir / f"{name}.png")
    write_tensorboard(out_dir, m, images, split, seed)
    text = markdown_report(m, [f"{name}.png" for name in figures], notes, timing)
    (out_dir / "report.md").write_text(text, encoding="utf-8")


def _tsne_figures(
    split: Any, m: Mapping[str, Any], max_points: int, seed: int, notes: list[str]
) -> dict[str, Figure]:
    figures = {}
    if len(split.heldout_labels) < 4:
        notes.append("No t-SNE: fewer than 4 held-out embeddings.")
        return figures
    figures["tsne"] = plot_tsne(
        split.heldout_emb, split.heldout_labels, split.classes, max_points, seed
    )
    worst = [name for name, _ in m.get("worst_classes") or []][:WORST_CLASSES]
    ids = [i for i, name in enumerate(split.classes) if name in set(worst)]
    if int(np.isin(split.heldout_labels, ids).sum()) >= 4:
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
