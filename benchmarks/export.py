"""Export at embedding speed: `python -m mltrain export` against a naive notebook-style export,
both timed as whole processes (start-up, imports, model build, embedding, writing).

    python benchmarks/export.py [--images 1500] [--runs 2]

The images are an even sample of the configs' data root (Caltech101), linked into a
temporary class-per-folder tree. The naive process (`--naive ROOT OUT`, this same file) does
what a notebook does: PIL full decode, torchvision transforms, the fp32 model one batch of 64
at a time, then np.save. Runs alternate naive, export, naive, ... and the ratio of the
medians is printed with the load average.
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
    from mltrain.data.archive import resolve_root
    from mltrain.data.folder import scan_folder

    cfg = load_config(REPO / "configs" / "pooling.yaml")
    folder = scan_folder(resolve_root(REPO / cfg.data.root), cfg.data.exclude_classes)
    root = work / "images"
    for i in sample_evenly(folder, n):
        src = folder.paths[i]
        dest = root / folder.classes[folder.labels[i]] / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src.resolve())
    return root


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--runs", type=int, default=2)
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
    times: dict[str, list[float]] = {"naive": [], "export": []}
    for _ in range(args.runs):
        times["naive"].append(timed(naive_cmd))
        times["export"].append(timed(export_cmd))
    n = args.images
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n} Caltech101 images, whole processes, {args.runs} runs each, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| process | median s | img/s | runs |")
    print("|---|---:|---:|---|")
    for k in ("naive", "export"):
        runs = ", ".join(f"{t:.1f}" for t in times[k])
        print(f"| {k} | {med[k]:.1f} | {n / med[k]:.1f} | {runs} |")
    print(f"export / naive: {med['naive'] / med['export']:.2f}x (target 6x)")


if __name__ == "__main__":
    main()
