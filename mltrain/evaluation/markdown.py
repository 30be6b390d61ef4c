"""The report's Markdown part: headline, verification, classes, PCA, index and timing
sections, each with what its numbers can and cannot say."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mltrain.files import size_text

WORST_CLASSES = 10


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
        "average precision of the same-class images among the first R_max results (R_max: "
        "the largest class's R), not only the first R; equal to MAP@R where classes are "
        "the same size",
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
    (
        "threshold_at_far_1e-3",
        "threshold @ FAR 1e-3",
        "lowest score accepting at most 0.1% of different-class pairs (what `mltrain verify` "
        "uses from a bundle)",
    ),
    ("num_pairs", "pairs", "pairs scored, half same-class where that many exist; a small "
     "held-out set gives each of its distinct pairs once"),
)


ONE_SHOT_HELP = (
    "N-way one-shot: one image of each of N classes is the support, another image of one of "
    "them the query; share of queries whose most similar support has their class"
)


# Below these counts a figure moves in steps too coarse to compare runs by (see _reliability).
FEW_QUERIES = 200
FAR_MIN_IMPOSTORS = {"tar_at_far_1e-2": 100, "tar_at_far_1e-3": 1000}
FEW_CLASS_QUERIES = 5
# Held-out classes named in the report's first line where there are at most this many.
NAMED_CLASSES = 25
# Verification on fewer classes: on 5-25 test people an EER moved 1-3 points between runs.
FEW_VERIFICATION_CLASSES = 30


FIGURE_TITLES = {
    "roc": "ROC curve",
    "pca": "Embedding length (PCA)",
    "tsne": "t-SNE of held-out embeddings",
    "tsne_worst": "t-SNE of the worst classes",
    "queries": "Example queries",
}


def fmt(value: Any) -> str:
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
    """Index sizes as the messages quote sizes (`size_text`), bytes shortened to `B`."""
    return f"{nbytes:.0f} B" if nbytes < 1024 else size_text(int(nbytes))


def _cell(text: Any) -> str:
    """A Markdown table cell: a class name with `|` or a newline must not break the table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def worst_below_mean(metrics: Mapping[str, Any], n: int = WORST_CLASSES) -> list[tuple[str, float]]:
    """The worst classes (`metrics["worst_classes"]`) that score below the mean per-class
    precision@1: a class at 1.0 is never "worst", even when every class is at 1.0."""
    mean = metrics.get("mean_per_class_precision_at_1")
    worst = list(metrics.get("worst_classes") or [])
    if mean is None:
        return worst[:n]
    return [(name, p1) for name, p1 in worst if p1 < mean][:n]


# The headline's figures: (key, label, lower is better).
SUMMARY = (
    ("precision_at_1", "precision@1", False),
    ("map_at_r", "MAP@R", False),
    ("roc_auc", "ROC AUC", False),
    ("eer", "EER", True),
)


SPLITS = {
    "per_class": "other images of the classes it trained on",
    "class_disjoint": "classes it never trained on",
    "none": "the images it trained on (split none: an optimistic figure)",
}


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def summary_section(m: Mapping[str, Any], data: Mapping[str, Any] | None = None,
                    baseline: Mapping[str, Any] | None = None) -> list[str]:
    """The first thing a reader sees: what was measured on which data, and the main figures,
    next to the untrained model's where `baseline` (its held-out metrics on the same images)
    is known. `data` may hold heldout_images, heldout_classes, train_images, split."""
    data = data or {}
    lines = []
    if "heldout_images" in data:
        what = _count(int(data["heldout_images"]), "held-out image")
        if "heldout_classes" in data:
            what += f" of {_count(int(data['heldout_classes']), 'class')}"
            names = list(data.get("heldout_class_names") or [])
            if 0 < len(names) <= NAMED_CLASSES:  # few enough to say which (unseen people)
                what += f" ({_cell(', '.join(names))})"
        split = data.get("split")
        if split in SPLITS:
            what += f", {SPLITS[split]}"
        if data.get("train_images"):
            what += f" (the model trained on {_count(int(data['train_images']), 'image')})"
        lines += [f"Measured on {what}.", ""]
    if m.get("source"):
        lines += [f"Source: `{m['source']}`", ""]
    ver = {**m, **(m.get("verification") or {})}
    rows = [(key, label, lower) for key, label, lower in SUMMARY if is_scalar(ver.get(key))]
    if not rows:
        return lines
    base = {**(baseline or {}), **((baseline or {}).get("verification") or {})}
    if any(is_scalar(base.get(key)) for key, _, _ in rows):
        table = []
        for key, label, lower in rows:
            now, then = float(ver[key]), base.get(key)
            if not is_scalar(then):
                table.append((label, f"**{fmt(now)}**", "n/a", ""))
                continue
            change = now - float(then)
            better = (change < 0) if lower else (change > 0)
            verdict = "better" if better else ("same" if change == 0 else "worse")
            table.append((label, f"**{fmt(now)}**", fmt(float(then)),
                          f"{change:+.4f} ({verdict})"))
        lines += md_table(["", "this model", "untrained", "change"], table)
    else:
        lines += md_table(["", "this model"], [(label, f"**{fmt(float(ver[key]))}**")
                                               for key, label, _ in rows])
    lines.append("")
    if m.get("num_queries") and m.get("precision_at_1") == 1.0:
        lines += ["Every query's nearest image has its class: these held-out images are too "
                  "few or too easy to tell models apart.", ""]
    return lines


def _headline_section(m: Mapping[str, Any]) -> list[str]:
    rows = [(label, fmt(m[key]), help) for key, label, help in HEADLINE if key in m]
    lines = ["## Retrieval", "", *md_table(["metric", "value", "what it measures"], rows), ""]
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


def verification_section(m: Mapping[str, Any]) -> list[str]:
    lines = []
    ver = m.get("verification") or {}
    if ver:
        rows = [(label, fmt(ver[key]), help) for key, label, help in VERIFICATION if key in ver]
        lines += [
            "## Verification",
            "",
            *md_table(["metric", "value", "what it measures"], rows),
            "",
        ]
    shots = m.get("one_shot") or {}
    if shots:
        rows = [
            (f"{n}-way", fmt(acc) if acc is not None else "n/a (too few classes)")
            for n, acc in sorted(shots.items(), key=lambda kv: int(kv[0]))
        ]
        lines += ["## One-shot", "", *md_table(["episode", "accuracy"], rows), "", ONE_SHOT_HELP
                  + ".", ""]
    within = m.get("one_shot_within_parent") or {}
    if within:  # eval.one_shot_within: each episode's classes from one parent folder
        rows = [(f"{n}-way", fmt(acc) if acc is not None else "n/a")
                for n, acc in sorted(within.items(), key=lambda kv: int(kv[0]))]  # fmt: skip
        lines += ["One-shot within one parent folder (every episode's classes siblings, as "
                  "Omniglot's within-alphabet protocol):", "",
                  *md_table(["episode", "accuracy"], rows), "", *_by_group(m)]  # fmt: skip
    return lines


def _by_group(m: Mapping[str, Any]) -> list[str]:
    """Within-parent one-shot per parent folder, by name: which parents are hard, and so why
    one split of a few parents scores unlike another."""
    by_group = m.get("one_shot_within_parent_by_group") or {}
    ways = sorted(by_group, key=int)
    groups = sorted({g for n in ways for g in by_group[n]})
    if len(groups) < 2:
        return []
    rows = [(g or "(top level)", *(fmt(by_group[n].get(g)) for n in ways)) for g in groups]
    return ["Per parent folder (each scored on its own episodes):", "",
            *md_table(["parent", *(f"{n}-way" for n in ways)], rows), ""]  # fmt: skip


def _classes_section(m: Mapping[str, Any]) -> list[str]:
    lines = []
    per_class = m.get("per_class") or {}
    worst = worst_below_mean(m)
    mean = m.get("mean_per_class_precision_at_1")
    if worst:
        rows = [
            (name, fmt(p1), per_class.get(name, {}).get("num_queries", "n/a"))
            for name, p1 in worst
        ]
        lines += [
            f"## Worst {len(worst)} classes",
            "",
            *md_table(["class", "precision@1", "queries"], rows),
            "",
        ]
        if mean is not None:
            lines += [f"Classes below the mean per-class precision@1 ({fmt(mean)}), "
                      f"lowest first, at most {WORST_CLASSES}.", ""]
    elif m.get("worst_classes"):  # a sentence, not a heading over nothing
        lines += ["No class is below the mean per-class precision@1 "
                  f"({fmt(mean)}): every class scores the same.", ""]
    pairs = m.get("confused_pairs")
    if pairs:
        lines += [f"## Most confused pairs (top-1, {len(pairs)} shown)", ""]
        lines += [*md_table(["true class", "retrieved class", "count"], pairs), ""]
    elif pairs is not None:
        lines += ["No top-1 mistakes: every query's nearest image has its class.", ""]
    return lines


def pca_section(m: Mapping[str, Any]) -> list[str]:
    pca = m.get("pca") or {}
    if not pca:
        return []
    rows = sorted(pca.values(), key=lambda r: r["length"])
    table = [
        (
            r["length"],
            "yes" if r.get("pca") else "no (full)",
            fmt(r.get("precision_at_1")),
            fmt(r.get("map_at_r")),
            fmt(r.get("book_accuracy")),
            f"{r['query_us']:.1f}" if "query_us" in r else "n/a",
            _size(r.get("index_bytes", r.get("bytes", 0))),
        )
        for r in rows
    ]
    lines = [
        "## Embedding length (PCA)",
        "",
        *md_table(
            ["length", "PCA", "precision@1", "MAP@R", "book accuracy", "µs/query", "index size"],
            table,
        ),
        "",
    ]
    if "pca_shortest_within_0.5" in m:
        short = next((r for r in rows if r["length"] == m["pca_shortest_within_0.5"]), rows[-1])
        saturated = (f" Precision@1 is saturated ({rows[-1]['precision_at_1']:.4f}): judge the "
                     f"length by MAP@R, {short['map_at_r']:.4f} there against {full_map:.4f}."
                     if rows[-1].get("precision_at_1", 0) >= 0.995 and short is not rows[-1]
                     and (full_map := rows[-1].get("map_at_r")) is not None else "")  # fmt: skip
        lines += [
            f"The shortest length within 0.5 points of full-length precision@1: "
            f"{m['pca_shortest_within_0.5']} (full length {rows[-1]['length']}).{saturated}",
            "",
        ]
    full = rows[-1]
    better = [r for r in rows[:-1] if r.get("precision_at_1", 0) > full.get("precision_at_1", 1)]
    if better:
        best = max(better, key=lambda r: r["precision_at_1"])
        lines += [
            f"PCA to {best['length']} scores above the full length (precision@1 "
            f"{fmt(best['precision_at_1'])} against {fmt(full['precision_at_1'])}): dropping "
            "low-variance directions removes features that vary within classes. The PCA is "
            "fitted on the training embeddings (with `data.split: none` those are the "
            "evaluated images, and part of the gain may be fitting them); check that the gap "
            "exceeds the noise (see above) before relying on it.",
            "",
        ]
    return lines


def index_section(m: Mapping[str, Any]) -> list[str]:
    indexes = m.get("indexes") or []
    if not indexes:
        return []
    rows = [
        (
            r["kind"],
            fmt(r["precision_at_1"]),
            fmt(r["map_at_r"]),
            f"{r['build_seconds']:.3f}",
            f"{r['query_us']:.1f}",
            _size(r["bytes"]),
        )
        for r in indexes
    ]
    return [
        "## Index comparison",
        "",
        *md_table(["index", "precision@1", "MAP@R", "build s", "µs/query", "size"], rows),
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
            f"{label} {fmt(r[key])} against {fmt(exact[key])}"
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


def timing_section(m: Mapping[str, Any], extra: Mapping[str, float]) -> list[str]:
    timing = {**(m.get("timing") or {}), **extra}
    if not timing:
        return []
    rows = [(k.removesuffix("_seconds").replace("_", " "), f"{v:.2f}") for k, v in timing.items()]
    return ["## Timing", "", *md_table(["step", "seconds"], rows), ""]


def _reliability(m: Mapping[str, Any]) -> list[str]:
    """What the amount of data makes too coarse to read closely, each with its reason."""
    out = []
    n = m.get("num_queries")
    if n:
        p1 = float(m.get("precision_at_1", 0.0))
        se = (p1 * (1 - p1) / n) ** 0.5
        spread = (f"standard error is about {se:.4f}" if se > 0 else
                  f"standard error says nothing at {p1:.4f}: by the rule of three the true rate "
                  f"may still be {3 / n:.4f} away")  # fmt: skip
        line = (
            f"{n} scored queries: one query moves precision@1 by {1 / n:.4f}, and its {spread}"
        )
        if n < FEW_QUERIES:
            line += "; differences between runs smaller than twice that are noise"
        out.append(line + ".")
    ver = m.get("verification") or {}
    pairs = ver.get("num_pairs")
    if pairs:
        impostors = int(ver.get("num_impostor", pairs - pairs // 2))
        for key, need in FAR_MIN_IMPOSTORS.items():
            if key in ver and impostors < need:
                out.append(
                    f"{key.replace('tar_at_far_', 'TAR @ FAR ')} is not resolved: it needs at "
                    f"least {need} different-class pairs (one false accept in {need}), there "
                    f"are {impostors}."
                )
    per_class = m.get("per_class") or {}
    n = int(ver.get("num_classes") or len(per_class))  # the classes the pairs were drawn from
    if pairs and "eer" in ver and 2 <= n < FEW_VERIFICATION_CLASSES:
        out.append(f"EER and ROC AUC rest on pairs of only {n} classes: another {n} would "
                   "move the EER by points, so compare runs on the same classes only.")
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
    data: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
) -> str:
    """The report as Markdown: one page that answers "how good, where does it fail, what to
    ship", its summary first (`summary_section`: `data` and the untrained `baseline`).
    `figures` are PNG file names next to it; `notes` say what was skipped and why (the
    evaluator's `metrics["notes"]` come first); `timing` adds the report's own steps to the
    evaluation timing."""
    lines = ["# Evaluation report", ""]
    lines += summary_section(metrics, data, baseline)
    lines += _headline_section(metrics)
    lines += verification_section(metrics)
    reliability = _reliability(metrics)
    if reliability:
        lines += ["## How far to trust these numbers", "", *[f"- {r}" for r in reliability], ""]
    lines += _classes_section(metrics)
    lines += pca_section(metrics)
    lines += index_section(metrics)
    lines += timing_section(metrics, timing or {})
    if figures:
        lines += ["## Figures", ""]
        for name in figures:
            title = FIGURE_TITLES.get(Path(name).stem, Path(name).stem)
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    notes = [*(metrics.get("notes") or []), *notes]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)
