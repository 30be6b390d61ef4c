"""Thumbnails and the query contact sheet: example queries beside their top results.

The sheet reuses the neighbours the metrics kept, so nothing is searched again, and it is
drawn on the same Agg canvas as the plots (`mltrain.evaluation.figures.new_figure`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from mltrain.data.images import load_image
from mltrain.errors import DataError
from mltrain.evaluation.figures import new_figure
from mltrain.evaluation.metrics import class_name
from mltrain.text import shortened

GREEN = (0, 160, 0)  # outline of a result of the query's class
RED = (220, 0, 0)  # outline of a result of another class
MISSING_GREY = 128  # tile shown for an image that no longer decodes
LABEL = 20  # characters per line of a class or file name on a query-grid tile (2 lines)


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
    scored, right = top1_right(neighbours)
    rng = np.random.default_rng(seed)
    wrong_rows = rng.permutation(scored[~right])
    right_rows = rng.permutation(scored[right])
    n_wrong = min(len(wrong_rows), max(n // 2, n - len(right_rows)))
    n_right = min(len(right_rows), n - n_wrong)
    return np.concatenate([np.sort(wrong_rows[:n_wrong]), np.sort(right_rows[:n_right])])


def top1_right(neighbours: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scored query rows, whether each one's top result has its class)."""
    scored = np.flatnonzero(np.asarray(neighbours.scored))
    top = np.asarray(neighbours.labels)[scored, 0]
    valid = np.asarray(neighbours.indices)[scored, 0] >= 0
    return scored, (top == np.asarray(neighbours.query_labels)[scored]) & valid


def queries_note(neighbours: Any, rows: Sequence[int], seed: int) -> str:
    """How the grid's queries were chosen, in one sentence (under the grid, in report.md)."""
    scored, right = top1_right(neighbours)
    shown_wrong = int(np.isin(rows, scored[~right]).sum())
    shown_right = len(rows) - shown_wrong
    n_wrong, n_right = int((~right).sum()), int(right.sum())

    def part(shown: int, of: int, what: str) -> str:
        some = f"all {of}" if shown == of else f"{shown} of the {of}"
        return f"{some} {'query' if of == 1 else 'queries'} whose top result is {what}"

    parts = [part(k, n, w) for k, n, w in ((shown_wrong, n_wrong, "wrong"),
                                           (shown_right, n_right, "right")) if k]  # fmt: skip
    drawn = "" if shown_wrong == n_wrong and shown_right == n_right else \
        f", drawn at random (seed {seed})"
    text = f"{' and '.join(parts)}{drawn}, of {len(scored)} scored queries."
    if n_wrong == 0:
        text += " No query's top result is wrong."
    return text[0].upper() + text[1:]


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
    height = 2.45 * max(len(rows), 1) + 0.9
    # A fixed layout: constrained layout costs more than the 50 images it arranges. Each
    # row: a title of up to 3 lines (rank, class in 2, score), the tile, 2 lines of file name.
    fig = new_figure(1.6 * (top + 1), height, layout=None)
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.7 / height, top=1 - 0.95 / height, wspace=0.12,
        hspace=0.95,
    )
    axes = fig.subplots(max(len(rows), 1), top + 1, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, q in enumerate(rows):
        truth = neighbours.query_labels[q]
        axes[r, 0].imshow(thumbnail(query_paths[q], thumb), interpolation="nearest")
        query = wrapped(class_name(truth, class_names), LABEL)
        axes[r, 0].set_title(f"query:\n{query}", fontsize=8, fontweight="bold")
        _file_label(axes[r, 0], query_paths[q])
        for j in range(top):
            idx, label = int(neighbours.indices[q, j]), neighbours.labels[q, j]
            hit = idx >= 0 and label == truth
            ax = axes[r, j + 1]
            if idx < 0:
                ax.imshow(np.full((thumb, thumb, 3), MISSING_GREY, np.uint8))
                ax.set_title(f"{j + 1}. (none)", fontsize=8, color=np.asarray(RED) / 255)
                continue
            tile = thumbnail(gallery_paths[idx], thumb)
            ax.imshow(outline(tile, GREEN if hit else RED, border), interpolation="nearest")
            name = wrapped(f"{j + 1}. {class_name(label, class_names)}", LABEL)
            ax.set_title(
                f"{name}\n{float(neighbours.scores[q, j]):.3f}",
                fontsize=8,
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
        fontsize=9,
        y=1 - 0.1 / height,
        va="top",
    )
    if chosen and len(rows):
        fig.text(0.5, 0.1 / height, queries_note(neighbours, rows, seed), fontsize=8,
                 ha="center", va="bottom", wrap=True)
    return fig


def wrapped(text: str, width: int, lines: int = 2) -> str:
    """`text` in lines of at most `width` characters, broken after "_", "-", "." or a space
    where one is near, at most `lines` of them; the last line of a longer text loses its
    middle (`shortened`), keeping the end that tells numbered files apart."""
    text, out = str(text), []
    while len(text) > width and len(out) < lines - 1:
        cut = max((text.rfind(c, width // 2, width) for c in "_-. /"), default=-1)
        cut = cut + 1 if cut > 0 else width
        out.append(text[:cut].rstrip())
        text = text[cut:]
    return "\n".join([*out, shortened(text, width)])


def _file_label(ax: Any, path: str | Path) -> None:
    ax.text(0.5, -0.03, wrapped(Path(path).name, LABEL + 4), transform=ax.transAxes,
            fontsize=7, ha="center", va="top", color="0.25", linespacing=1.1)


