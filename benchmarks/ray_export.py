"""`export --ray` against the single-process `export`, both timed as whole processes (start-up,
imports, Ray's start and its actors' model builds, embedding, writing), and Ray's throughput
with 1 and 2 actors.

    python benchmarks/ray_export.py [--images 1500] [--runs 2] [--actors 1 2]

The images are the even Caltech101 sample `benchmarks/export.py` links into a temporary
class-per-folder tree; both exports write the same bundle (tf_efficientnet_lite0, the pooling
config, split none). Runs alternate (single, `--ray` with its default pool, Ray with each
actor count, single, ...), each preceded by its one-minute load average, so a busy machine
shows beside the figure it disturbed. The bar: `export --ray` (the default pool) within 1.3x
of the single-process export's wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, target_line  # noqa: E402
from benchmarks.export import subset  # noqa: E402

BAR = 1.3  # whole-process time of export --ray over the single-process export, at most
EXPORTED = re.compile(r"exported (\d+) images in ([\d.]+) s")


def export_cmd(root: Path, out: Path, backbone: str, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "mltrain", "export", "--backbone", backbone,
            "--config", "configs/pooling.yaml", "--set", f"data.root={root}",
            "--set", "data.split=none", "--out", str(out), *extra]  # fmt: skip


Run = tuple[float, float, float]  # wall s, export s, load average before


def timed(cmd: list[str]) -> Run:
    """(whole-process seconds, the export's own seconds from its last line, the load average
    before the run)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    found = EXPORTED.search(proc.stdout)
    return wall, float(found.group(2)) if found else float("nan"), load


DEFAULT = "--ray (default pool)"


def variants(actors: Sequence[int]) -> dict[str, list[str]]:
    out = {"single process": [], DEFAULT: ["--ray"]}
    for n in actors:
        out[f"--ray, {n} actor{'s' if n > 1 else ''}"] = ["--ray", "--ray-actors", str(n)]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--actors", type=int, nargs="*", default=[1, 2],
                   help="actor counts to time beside the default pool (held to the bar)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mltrain-ray-bench-"))
    runs: dict[str, list[Run]] = {k: [] for k in variants(args.actors)}
    try:
        root = subset(args.images, work)
        for _ in range(args.runs):
            for name, extra in variants(args.actors).items():
                out = work / f"bundle-{len(runs[name])}-{name.split(',')[-1].strip()}"
                runs[name].append(timed(export_cmd(root, out, args.backbone, extra)))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # links and bundles only: the images stay
    report(runs, args, len(os.sched_getaffinity(0)))


def report(runs: dict[str, list[Run]], args, cpus: int) -> None:
    n = args.images
    single = statistics.median(r[0] for r in runs["single process"])
    print(f"{n} Caltech101 images, {args.backbone}, whole processes, {args.runs} runs each, "
          f"{cpus} CPUs, load average now {os.getloadavg()[0]:.1f}")  # fmt: skip
    rows = []
    for name, timings in runs.items():
        wall, inside = (statistics.median(r[i] for r in timings) for i in range(2))
        rows.append([name, wall, n / wall, wall / single, inside, n / inside,
                     ", ".join(f"{r[0]:.1f}" for r in timings),
                     ", ".join(f"{r[2]:.1f}" for r in timings)])  # fmt: skip
    print(markdown_table(["process", "median s", "img/s", "x single", "export s", "export img/s",
                          "runs s", "load before each"], rows))  # fmt: skip
    ratio = statistics.median(r[0] for r in runs[DEFAULT]) / single
    print(target_line(f"{DEFAULT} / single process", ratio, BAR, higher_is_better=False))


if __name__ == "__main__":
    main()
