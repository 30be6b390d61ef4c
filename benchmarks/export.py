"""Export at embedding speed: `python -m mltrain export` against a naive notebook-style export,
both timed as whole processes (start-up, imports, model build, embedding, writing).

    python benchmarks/export.py [--images 1500] [--runs 2] [--backends torch,auto]
    python benchmarks/export.py --breakdown [--images 1500]

The images are an even sample of the configs' data root (Caltech101), linked into a
temporary class-per-folder tree. The naive process (`--naive ROOT OUT`, this same file) does
what a notebook does: PIL full decode, torchvision transforms, the fp32 model one batch of 64
at a time, then np.save. Runs alternate naive, export, naive, ... and the ratio of the
medians is printed with the load average; with `--backends`, one export row per
`eval.backend` (torch, openvino, auto).

`--breakdown` runs one export under `python -X importtime -m cProfile` and prints where its
seconds go: imports, the model build, the image check (every file decoded once before
embedding), OpenVINO's setup, the embedding, the index, the threshold calibration, the writing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def naive(root: Path, out: Path) -> None:
    """The notebook loop, as one process."""
    import numpy as np
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from mltrain.config import load_config
    from mltrain.model.network import build_model, data_config

    cfg = load_config(REPO / "configs" / "pooling.yaml",
                      ["model.trainable_stages=null", "train.cache_frozen=false"])
    model = build_model(cfg.model).eval()
    dcfg = data_config(model, cfg.model)
    _, h, w = dcfg["input_size"]
    transform = T.Compose([T.Resize(h, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop((h, w)), T.ToTensor(),
                           T.Normalize(dcfg["mean"], dcfg["std"])])  # fmt: skip
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    out_rows = []
    with torch.no_grad():
        for start in range(0, len(paths), 64):
            batch = [transform(Image.open(p).convert("RGB")) for p in paths[start : start + 64]]
            out_rows.append(model.embed(torch.stack(batch)).numpy())
    np.save(out, np.concatenate(out_rows))


def subset(n: int, work: Path) -> Path:
    from benchmarks.common import sample_evenly
    from mltrain.config import load_config
    from mltrain.data.readers import read_images

    cfg = load_config(REPO / "configs" / "pooling.yaml")
    folder = read_images(REPO / cfg.data.root, cfg.data.exclude_classes)
    root = work / "images"
    for i in sample_evenly(folder, n):
        src = folder.paths[i]
        dest = root / folder.classes[folder.labels[i]] / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src.resolve())
    return root


# Phases of an export: (label, function names whose largest cumulative time is the phase's).
PHASES = [
    ("model build (weights read)", ("embedder_from_backbone", "embedder_from_checkpoint")),
    ("image scan and decode check", ("prepare_data",)),
    ("  of which the decode check", ("check_images",)),
    ("OpenVINO compile and parity", ("_on_openvino",)),
    ("embedding (all images)", ("embed", "embed_batches")),
    ("index build", ("build_gallery",)),
    ("threshold calibration", ("_calibration",)),
    ("writing (metadata, weights, manifest)", ("write_metadata", "save_state_dict",
                                               "finish_manifest", "move_into_place")),
]


def top_level_import_seconds(importtime: str) -> float:
    """The sum of the cumulative times of top-level imports in `-X importtime` output (lines
    `import time: self | cumulative | name`, nested names indented by two more spaces)."""
    total = 0
    for line in importtime.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            if not parts[2].startswith("  "):
                total += int(parts[1])
    return total / 1e6


def breakdown(cmd: list[str], work: Path) -> None:
    """One export under -X importtime and cProfile: its phases in seconds."""
    import pstats

    prof = work / "export.prof"
    full = [cmd[0], "-X", "importtime", "-m", "cProfile", "-o", str(prof), *cmd[1:]]
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(full, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    imports = top_level_import_seconds(done.stderr)
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    print(f"export breakdown ({wall:.1f} s wall under the profiler; load average "
          f"{os.getloadavg()[0]:.1f})")
    print("| phase | seconds | share |")
    print("|---|---:|---:|")
    print(f"| imports (top-level, -X importtime) | {imports:.1f} | {imports / wall:.0%} |")
    for label, names in PHASES:
        secs = sum(max([v[3] for k, v in stats.items() if k[2] == n] or [0.0]) for n in names)
        print(f"| {label} | {secs:.1f} | {secs / wall:.0%} |")


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--backends", default="",
                   help="comma-separated eval.backend values timed as extra export rows")
    p.add_argument("--breakdown", action="store_true",
                   help="profile one export and print its phases instead")
    p.add_argument("--naive", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive:
        naive(Path(args.naive[0]), Path(args.naive[1]))
        return
    work = Path(tempfile.mkdtemp(prefix="mltrain-export-bench-"))
    root = subset(args.images, work)
    py = sys.executable
    naive_cmd = [py, __file__, "--naive", str(root), str(work / "naive.npy")]
    export_cmd = [py, "-m", "mltrain", "export", "--backbone", "tf_efficientnet_lite0",
                  "--config", "configs/pooling.yaml", "--set", f"data.root={root}",
                  "--set", "data.split=none",
                  "--out", str(work / "bundle")]  # fmt: skip
    if args.breakdown:
        breakdown(export_cmd, work)
        return
    cmds = {"naive": naive_cmd, "export": export_cmd}
    for b in filter(None, args.backends.split(",")):
        cmds[f"export eval.backend={b}"] = [*export_cmd, "--set", f"eval.backend={b}"]
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.runs):
        for k, cmd in cmds.items():
            times[k].append(timed(cmd))
    n = args.images
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n} Caltech101 images, whole processes, {args.runs} runs each, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| process | median s | img/s | runs |")
    print("|---|---:|---:|---|")
    for k in cmds:
        runs = ", ".join(f"{t:.1f}" for t in times[k])
        print(f"| {k} | {med[k]:.1f} | {n / med[k]:.1f} | {runs} |")
    print(f"export / naive: {med['naive'] / med['export']:.2f}x (target 6x)")


if __name__ == "__main__":
    main()
