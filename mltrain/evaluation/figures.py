"""Report plots: ROC, PCA and t-SNE, and the Agg canvas every report figure is drawn on.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, never through
pyplot: no global backend switch, no figure registry to leak, safe in notebooks and threads.
Nothing here builds an N x N matrix: t-SNE runs on a bounded sample. Thumbnails and the query
contact sheet are in `mltrain.evaluation.contact_sheet`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from mltrain.errors import DataError
from mltrain.evaluation.metrics import class_name
from mltrain.inference.vectors import l2_normalize
from mltrain.text import shortened

LEGEND_MAX_CLASSES = 20  # more classes in a t-SNE plot: only the highlighted ones coloured
TSNE_PCA_DIMS = 50  # t-SNE runs on this many PCA components (see `tsne_2d`)
TSNE_MAX_ITER = 750
FIGURE_DPI = 120


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
    with warnings.catch_warnings():
        # Class names in scripts the font lacks (CJK) draw as boxes; a warning per glyph and
        # figure would bury the run's own output.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")  # any version
        canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_roc(
    fpr: Sequence[float],
    tpr: Sequence[float],
    verification: Mapping[str, Any] | None = None,
) -> Figure:
    """The verification ROC on a log FAR axis, with the EER point and FAR 1e-3 marked.

    One style everywhere (training's TensorBoard image and the report): the log axis spreads
    the low-FAR end, where a deployed threshold lives. Points at FAR 0 are dropped (log 0 is
    undefined); the axis starts just left of FAR 1e-3 or of the smallest measured FAR.
    """
    fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    keep = fpr > 0
    fpr, tpr = fpr[keep], tpr[keep]
    low = min(5e-4, float(fpr.min()) / 2) if len(fpr) else 5e-4
    fig = new_figure(5, 4.5)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    chance = np.logspace(np.log10(low), 0, 50)
    ax.plot(chance, chance, ":", color="grey", lw=1, label="chance")
    ax.plot(fpr, tpr, lw=2, color="tab:blue", label="ROC")
    ax.set_xlim(low, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (FAR), log scale")
    ax.set_ylabel("true accept rate (TAR)")
    ver = verification or {}
    if is_number(ver.get("eer")):
        eer = float(ver["eer"])
        ax.plot([max(eer, low)], [1 - eer], "o", color="tab:red", ms=7,
                label=f"EER {eer:.4f} (FAR = 1 - TAR)")
    resolvable = len(fpr) and float(fpr.min()) <= 1e-3
    ax.axvline(1e-3, color="tab:green", ls="--", lw=1)
    if is_number(ver.get("tar_at_far_1e-3")) and resolvable:
        tar = float(ver["tar_at_far_1e-3"])
        ax.plot([1e-3], [tar], "s", color="tab:green", ms=6, label=f"FAR 1e-3: TAR {tar:.4f}")
    else:
        ax.plot([], [], "--", color="tab:green", lw=1, label="FAR 1e-3 (too few impostor pairs)")
    title = "ROC"
    if is_number(ver.get("roc_auc")):
        title = f"ROC: AUC {float(ver['roc_auc']):.4f}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value)


def plot_pca(rows: Sequence[Mapping[str, Any]], shortest: int | None = None) -> Figure:
    """Quality and latency against embedding length, to pick the shortest length to ship.

    precision@1 and MAP@R share the left axis (both fractions); per-query microseconds go on
    a twin right axis. Lengths sit on a log axis, so 128 to 1280 spans what it is (ten
    times) rather than one step like 8 to 16; each has a tick, and a label unless it would
    print over its left neighbour's (100 next to 128 keeps one). The legend goes under the
    axes, where it cannot cover a curve.
    """
    rows = sorted(rows, key=lambda r: r["length"])
    lengths = [r["length"] for r in rows]
    x = np.asarray(lengths, dtype=float)
    fig = new_figure(6, 4.4)
    ax = fig.add_subplot()
    ax.plot(x, [r["precision_at_1"] for r in rows], "o-", label="precision@1")
    ax.plot(x, [r["map_at_r"] for r in rows], "s-", label="MAP@R")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    span = max(np.log2(x[-1] / x[0]), 1.0) if len(x) else 1.0
    labels, last = [], None
    for i, (n, r) in enumerate(zip(lengths, rows, strict=True)):
        full = not r.get("pca", True)
        crowded = last is not None and np.log2(n / last) < 0.06 * span
        if crowded and not full and i < len(rows) - 1:
            labels.append("")
            continue
        if crowded and labels:  # the full length (or the last) wins over its neighbour
            labels[-1] = ""
        labels.append(f"{n}\n(full)" if full else str(n))
        last = n
    ax.set_xticks(x, labels)
    if len(x):
        ax.set_xlim(x[0] / 2 ** (0.04 * span), x[-1] * 2 ** (0.04 * span))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("embedding length, log scale (PCA fitted on the training embeddings)")
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
        ax.axvline(shortest, color="tab:green", ls=":", lw=1.5)
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
    x = l2_normalize(emb)
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


def spread_colours(centres: np.ndarray) -> np.ndarray:
    """One colour per class (rows of `centres`, the classes' 2-D medians), placed so that
    classes close on the plot get colours far apart.

    Palettes hand out near-identical colours to neighbouring indices (tab20 pairs each colour
    with its lighter twin), and neighbouring indices are often similar classes (cat_1, cat_2)
    drawn side by side. Greedily, from the most crowded class outwards, each class takes the
    unused colour farthest from those of its three nearest coloured classes; then swaps
    widen the closest pair. Twins count as close whatever their RGB distance."""
    n = len(centres)
    palette = class_colours(n)
    if n <= 2:
        return palette
    apart = np.abs(palette[:, None, :3] - palette[None, :, :3]).sum(-1)  # L1 in RGB
    if 10 < n <= 20:  # tab20: index 2k and 2k + 1 are one hue, dark and light
        twins = np.arange(n)[:, None] // 2 == np.arange(n)[None, :] // 2
        apart = np.where(twins, apart * 0.25, apart)
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    near = np.argsort(dist, axis=1)[:, 1:4]  # each class's three nearest
    crowded = np.argsort(np.sort(dist, axis=1)[:, 1])
    chosen: dict[int, int] = {}
    unused = list(range(n))
    for c in crowded:
        coloured = [chosen[j] for j in np.argsort(dist[c]) if j in chosen][:3]
        pick = unused[int(np.argmax([apart[u, coloured].min() for u in unused]))] \
            if coloured else unused[0]
        chosen[int(c)] = pick
        unused.remove(pick)
    order = np.array([chosen[c] for c in range(n)])

    def score(colour_of: np.ndarray) -> tuple[float, float]:
        gaps = apart[colour_of[:, None], colour_of[near]]
        return float(gaps.min()), float(gaps.mean())

    best = score(order)
    for _ in range(3):
        improved = False
        for a in range(n):
            for b in range(a + 1, n):
                order[[a, b]] = order[[b, a]]
                now = score(order)
                if now > best:
                    best, improved = now, True
                else:
                    order[[a, b]] = order[[b, a]]
        if not improved:
            break
    return palette[order]


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
    misses: np.ndarray | None = None,
) -> Figure:
    """t-SNE scatter of at most `max_points` seeded-sampled points.

    `keep_classes` (names) restricts the plot to those classes, e.g. the worst ones, which
    a full plot drowns. Up to 20 classes get a colour each (`spread_colours`: neighbours on
    the plot differ) and a legend. Beyond that colours no longer tell classes apart (and a
    101-entry legend covers the plot), so every point is grey, each class name is printed at
    the median of its points, and only the `highlight` classes (e.g. the worst, at most 10)
    are coloured, with a legend. `misses` (one flag per row of `labels`) rings the points
    whose top search result has another class.
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
    centres = np.array([np.median(xy[sampled == c], axis=0) for c in coloured]).reshape(-1, 2)
    colours = dict(zip(coloured, spread_colours(centres), strict=True))
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
    missed = np.asarray(misses, dtype=bool)[rows] if misses is not None else None
    if missed is not None and missed.any():
        ax.scatter(xy[missed, 0], xy[missed, 1], s=size * 2.5, facecolors="none",
                   edgecolors="black", linewidths=0.8,
                   label=f"top result wrong ({int(missed.sum())})")
    if many:
        for label in present:
            centre = np.median(xy[sampled == label], axis=0)
            hot = label in colours
            ax.annotate(shortened(names[int(label)], 14), centre, fontsize=6 if hot else 5,
                        ha="center", va="center", color="black" if hot else "0.35",
                        fontweight="bold" if hot else "normal")
    if colours or (missed is not None and missed.any()):
        heading = highlight_title if many and colours else None
        ax.legend(fontsize=7, markerscale=1.5, loc="center left",
                  bbox_to_anchor=(1.01, 0.5), frameon=False, title=heading, title_fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({len(rows)} points, {len(present)} classes)", fontsize=10)
    return fig
