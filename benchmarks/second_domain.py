"""One-shot on a domain unlike ImageNet photos: pretrained against trained, as a user runs it.

Generates greyscale line drawings in the nested layout of handwritten-character sets
(`alphabet_k/char_j/N.pgm`, each class a fixed set of strokes redrawn with jitter), then runs
the whole commands:

    python evaluate.py --backbone tf_efficientnet_lite0 --config configs/<mode>.yaml \
        --set data.root=DIR --set data.split=class_disjoint --set data.train_fraction=0.8
    python train.py --config configs/<mode>.yaml --set data.root=DIR \
        --set data.split=class_disjoint --set data.train_fraction=0.8
    python evaluate.py --checkpoint <run>/checkpoints/best.pt

and prints held-out (unseen classes) 20-way and 5-way one-shot accuracy, ROC AUC, EER and
MAP@R for each. Usage: python benchmarks/second_domain.py [--modes siamese triplet]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.foreign_data import write_drawings  # noqa: E402

SPLIT = ["--set", "data.split=class_disjoint", "--set", "data.train_fraction=0.8"]


def run(args: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1], time.perf_counter() - start


def figures(eval_dir: Path) -> dict[str, float]:
    m = json.loads((eval_dir / "metrics.json").read_text())
    ver, shots = m.get("verification") or {}, m.get("one_shot") or {}
    return {"20-way": shots.get("20"), "5-way": shots.get("5"), "roc_auc": ver.get("roc_auc"),
            "eer": ver.get("eer"), "map_at_r": m["map_at_r"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--modes", nargs="+", default=["siamese", "triplet"])
    p.add_argument("--alphabets", type=int, default=10)
    p.add_argument("--chars", type=int, default=12)
    p.add_argument("--per-class", type=int, default=15)
    p.add_argument("--set", dest="extra", action="append", default=[], help="train override")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mltrain-domain-"))
    root = write_drawings(work / "drawings", args.alphabets, args.chars, args.per_class)
    classes = args.alphabets * args.chars
    print(f"{classes} classes x {args.per_class} greyscale PGM drawings; 80% of the classes "
          f"train, {classes - int(0.8 * classes + 0.5)} unseen classes are evaluated")  # fmt: skip
    rows = []
    for mode in args.modes:
        cfg = ["--config", f"configs/{mode}.yaml", "--set", f"data.root={root}",
               "--set", f"output_dir={work / 'exp'}", *SPLIT]  # fmt: skip
        out, secs = run(["evaluate.py", "--backbone", "tf_efficientnet_lite0", *cfg])
        rows.append((f"{mode}: pretrained", figures(Path(out.removeprefix("results: "))), secs))
        extra = [a for s in args.extra for a in ("--set", s)]
        run_dir, train_s = run(["train.py", *cfg, *extra])
        out, secs = run(["evaluate.py", "--checkpoint", f"{run_dir}/checkpoints/best.pt"])
        rows.append((f"{mode}: trained", figures(Path(out.removeprefix("results: "))), train_s))
    print("| model | 20-way one-shot | 5-way | ROC AUC | EER | MAP@R | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, f, secs in rows:
        cells = [f"{f[k]:.4f}" if f[k] is not None else "–" for k in
                 ("20-way", "5-way", "roc_auc", "eer", "map_at_r")]  # fmt: skip
        print(f"| {name} | {' | '.join(cells)} | {secs:.0f} |")
    print(f"(seconds: the evaluate command for pretrained rows, the train command for trained; "
          f"data and runs in {work})")  # fmt: skip


if __name__ == "__main__":
    main()
