"""Helpers shared by the benchmark scripts: configs, data sampling, tables, RSS, timing.

Every benchmark reports ratios against a baseline measured in the same process (the machine
may be shared), plus the absolute figures and the load average they were taken under.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# No progress bars in benchmark output: tqdm reads this when it is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")
if str(REPO) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the repo, first
    sys.path.append(str(REPO))

from mltrain.config import Config, load_config  # noqa: E402
from mltrain.data.labelled import ImageFolder  # noqa: E402
from mltrain.data.readers import read_images, resolve_root  # noqa: E402

CONFIGS = REPO / "configs"
MODES = ("classification", "pooling", "siamese", "triplet")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the image benchmarks (the smoke tests use a small, random model)."""
    parser.add_argument("--root", default=None,
                        help="class-per-folder image root or archive (default: the configs' "
                             "data.root, Caltech101)")
    parser.add_argument("--backbone", default=None, help="timm backbone (default: the config's)")
    parser.add_argument("--pretrained", default=None,
                        help="true | false | offline | weights file (default: the config's)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input size (default: the backbone's data config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="extra config override, repeatable")


def model_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.backbone:
        out.append(f"model.backbone={args.backbone}")
    if args.pretrained is not None:
        out.append(f"model.pretrained={args.pretrained}")
    if args.image_size:
        out.append(f"model.image_size={args.image_size}")
    return out + list(args.overrides)


def data_root(args_root: str | None, cfg: Config) -> Path:
    """The image folder: `--root`, else the config's root (relative paths from the repo)."""
    root = Path(args_root or cfg.data.root).expanduser()
    if not root.is_absolute() and not root.exists():
        root = REPO / root
    return resolve_root(root)


def config_for(mode: str, root: Path, overrides: Sequence[str] = ()) -> Config:
    """`configs/<mode>.yaml` pointed at `root`; excluded classes kept only where they exist."""
    base = load_config(CONFIGS / f"{mode}.yaml")
    exclude = [c for c in base.data.exclude_classes if (root / c).is_dir()]
    return load_config(
        CONFIGS / f"{mode}.yaml",
        [f"data.root={root}", f"data.exclude_classes={exclude}", *overrides],
    )


def scan(cfg: Config) -> ImageFolder:
    return read_images(cfg.data.root, exclude=cfg.data.exclude_classes)


def sample_evenly(folder: ImageFolder, n: int) -> np.ndarray:
    """`n` image indices spread evenly over the classes (round robin, each class's images
    taken at even spacing); n <= 0 or n >= len(folder) means all images."""
    if n <= 0 or n >= len(folder):
        return np.arange(len(folder))
    by_class = [np.flatnonzero(folder.labels == c) for c in range(len(folder.classes))]
    by_class = [idx for idx in by_class if len(idx)]
    quota = np.zeros(len(by_class), dtype=int)
    remaining = n
    while remaining:  # round robin over classes that still have images
        open_ = [i for i, idx in enumerate(by_class) if quota[i] < len(idx)]
        for i in open_[:remaining]:
            quota[i] += 1
        remaining -= min(remaining, len(open_))
    picked = []
    for idx, q in zip(by_class, quota, strict=True):
        if q:
            picked.append(idx[np.linspace(0, len(idx) - 1, q).round().astype(int)])
    return np.sort(np.concatenate(picked))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(v: object) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "n/a"
        if 0 < abs(v) < 0.005:  # a few milliseconds must not print as 0.00
            return f"{v:.2g}"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def target_line(name: str, value: float, threshold: float, higher_is_better: bool = True,
                unit: str = "") -> str:
    met = value >= threshold if higher_is_better else value < threshold
    op = ">=" if higher_is_better else "<"
    return (f"target {name} {op} {threshold:g}{unit}: {value:.3g}{unit} -> "
            f"{'met' if met else 'NOT met'}")


def rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (Linux reports KiB). For RUSAGE_CHILDREN: the largest
    peak of any waited-for child (e.g. DataLoader workers), not a sum."""
    return resource.getrusage(who).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def load_note() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


@contextmanager
def stopwatch(acc: dict[str, float], key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        acc[key] = acc.get(key, 0.0) + time.perf_counter() - start


def interleaved_order(variants: Sequence[str], round_: int) -> list[str]:
    """Forward order on even rounds, reversed on odd ones: slow drifts in machine load then
    hit every variant about equally."""
    return list(variants) if round_ % 2 == 0 else list(reversed(variants))


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (e.g. DataLoader workers, which
    are joined when their loader goes away)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_rounds(variants: dict[str, Callable[[int], int]], rounds: int, times: dict[str, float],
               counts: dict[str, int], cpu: dict[str, float] | None = None) -> None:
    """Call each variant once per round (order alternating); each returns the images it did.
    Wall seconds (and CPU seconds, when `cpu` is given) accumulate per variant."""
    for r in range(rounds):
        for name in interleaved_order(list(variants), r):
            c0 = cpu_seconds()
            with stopwatch(times, name):
                done = variants[name](r)
            if cpu is not None:
                cpu[name] = cpu.get(name, 0.0) + cpu_seconds() - c0
            counts[name] = counts.get(name, 0) + done


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")


def apply_threads(n: int | None) -> int:
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
