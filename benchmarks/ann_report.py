"""The ANN benchmark's rows and how they are reported: the markdown table, the target line,
the ratios to the IVF-Flat baseline, vectors per GB and the recall/latency plot."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

try:
    from benchmarks.ann_data import K
except ImportError:  # run as `python benchmarks/ann.py`
    from ann_data import K  # type: ignore[no-redef]

TARGET_RECALL = 0.95
TARGET_US = 40.0  # single-query median, one thread


@dataclass
class Row:
    dataset: str
    index: str
    params: str
    search: str
    build_s: float
    median_us: float
    p99_us: float
    batch_us: float
    recall: float
    nbytes: int
    rss_mb: float
    ntotal: int

    @property
    def bytes_per_vector(self) -> float:
        return self.nbytes / max(1, self.ntotal)


def table(rows: list[Row]) -> str:
    head = (
        "| index | build params | search | build s | median us | p99 us | batch us/q "
        f"| recall@{K} | index MB | bytes/vec | RSS growth MB |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.index} | {r.params} | {r.search} | {r.build_s:.1f} | {r.median_us:.1f} | "
        f"{r.p99_us:.1f} | {r.batch_us:.1f} | {r.recall:.3f} | {r.nbytes / 2**20:.1f} | "
        f"{r.bytes_per_vector:.0f} | {r.rss_mb:.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def target_line(rows: list[Row]) -> str:
    good = [r for r in rows if r.recall >= TARGET_RECALL]
    if not good:
        return (
            f"target: no index reached recall@{K} >= {TARGET_RECALL} "
            f"(>= {TARGET_RECALL}, < {TARGET_US:.0f} us): not met"
        )
    best = min(good, key=lambda r: r.median_us)
    met = "met" if best.median_us < TARGET_US else "not met"
    label = best.index + (f" ({best.search})" if best.search != "-" else "")
    return (
        f"target: {label} answers single queries in {best.median_us:.0f} us median at "
        f"recall@{K} {best.recall:.3f} (>= {TARGET_RECALL}, < {TARGET_US:.0f} us): {met}"
    )


def baseline_lines(rows: list[Row], baseline: str = "ivf_flat") -> list[str]:
    """Each index's fastest setting with recall@K >= TARGET_RECALL, against the baseline's."""
    best: dict[str, Row] = {}
    for r in rows:
        if r.recall >= TARGET_RECALL and (r.index not in best
                                          or r.median_us < best[r.index].median_us):
            best[r.index] = r
    if baseline not in best:
        return [f"vs {baseline}: it reached no recall@{K} >= {TARGET_RECALL}; no ratios"]
    ref = best[baseline]
    return [
        f"vs {baseline} ({ref.search}, {ref.median_us:.1f} us): {r.index} ({r.search}) "
        f"{r.median_us:.1f} us median, {ref.median_us / r.median_us:.2f}x as fast, "
        f"recall@{K} {r.recall:.3f}, build {r.build_s / max(ref.build_s, 1e-9):.2f}x"
        for r in best.values()
    ]


def per_gb_lines(rows: list[Row]) -> list[str]:
    seen: dict[str, Row] = {}
    for r in rows:
        seen.setdefault(r.index, r)
    return [
        f"vectors per GB: {r.index:8s} {1e9 / r.bytes_per_vector:>13,.0f}  "
        f"({r.bytes_per_vector:.0f} bytes/vector, {r.params})"
        for r in seen.values()
    ]


def plot(rows: list[Row], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(r.index for r in rows):
        rs = sorted((r for r in rows if r.index == name), key=lambda r: r.median_us)
        ax.plot([r.median_us for r in rs], [r.recall for r in rs], marker="o", label=name)
        for r in rs:
            if r.search != "-":
                ax.annotate(r.search.split("=")[1], (r.median_us, r.recall), fontsize=7,
                            xytext=(3, -9), textcoords="offset points")  # fmt: skip
    ax.axhline(TARGET_RECALL, color="grey", ls="--", lw=0.8)
    ax.axvline(TARGET_US, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("single-query latency, median (us, log scale)")
    ax.set_ylabel(f"recall@{K}")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
