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

`--root DATA --train-fraction F` runs the same protocol on your own folder instead (Caltech101:
`--root ../shared/data/101_ObjectCategories.tar.gz --train-fraction 0.505`, 51 classes train and
50 are unseen). Configs that pool alike share one pretrained row (their untrained backbones embed
identically); `--eval-set` overrides go to every evaluate command.
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


def split_args(fraction: float) -> list[str]:
    return ["--set", "data.split=class_disjoint", "--set", f"data.train_fraction={fraction}"]


def pooling_of(mode: str) -> str:
    """The pooling line of a shipped config: the untrained backbone's embedding depends on it
    (and the crop, which every shipped config sets alike), not on the loss or the head."""
    text = (REPO / "configs" / f"{mode}.yaml").read_text()
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.strip().startswith("pooling:")), "")  # fmt: skip


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
            "eer": ver.get("eer"), "map_at_r": m["map_at_r"],
            "p@1": m["precision_at_1"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--modes", nargs="+", default=["siamese", "triplet"])
    p.add_argument("--root", help="an image folder, archive or CSV instead of generated drawings")
    p.add_argument("--train-fraction", type=float, default=0.8, help="share of classes trained")
    p.add_argument("--alphabets", type=int, default=10)
    p.add_argument("--chars", type=int, default=12)
    p.add_argument("--per-class", type=int, default=15)
    p.add_argument("--set", dest="extra", action="append", default=[], help="train override")
    p.add_argument("--eval-set", dest="eval_extra", action="append", default=[],
                   help="evaluate override, e.g. eval.tsne=false")  # fmt: skip
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mltrain-domain-"))
    if args.root:
        root = Path(args.root).resolve()
        print(f"{root}: {args.train_fraction:g} of the classes train, the rest are evaluated")
    else:
        root = write_drawings(work / "drawings", args.alphabets, args.chars, args.per_class)
        classes = args.alphabets * args.chars
        print(f"{classes} classes x {args.per_class} greyscale PGM drawings; "
              f"{args.train_fraction:g} of the classes train, the rest are evaluated")  # fmt: skip
    flags = lambda key, sets: [a for s in sets for a in (key, s)]  # noqa: E731
    evals = flags("--set", args.eval_extra)
    rows, pretrained = [], {}
    for mode in args.modes:
        cfg = ["--config", f"configs/{mode}.yaml", "--set", f"data.root={root}",
               "--set", f"output_dir={work / 'exp'}", *split_args(args.train_fraction)]  # fmt: skip
        if pooling_of(mode) not in pretrained:
            out, secs = run(["evaluate.py", "--backbone", "tf_efficientnet_lite0", *cfg, *evals])
            pretrained[pooling_of(mode)] = mode
            rows.append((f"{mode}: pretrained ({pooling_of(mode)})",
                         figures(Path(out.removeprefix("results: "))), secs))  # fmt: skip
        run_dir, train_s = run(["train.py", *cfg, *flags("--set", args.extra)])
        out, secs = run(["evaluate.py", "--checkpoint", f"{run_dir}/checkpoints/best.pt", *evals])
        rows.append((f"{mode}: trained", figures(Path(out.removeprefix("results: "))), train_s))
        print(f"{mode}: trained in {train_s:.0f} s, {run_dir}", flush=True)
    print("| model | 20-way one-shot | 5-way | ROC AUC | EER | MAP@R | precision@1 | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, f, secs in rows:
        cells = [f"{f[k]:.4f}" if f[k] is not None else "–" for k in
                 ("20-way", "5-way", "roc_auc", "eer", "map_at_r", "p@1")]  # fmt: skip
        print(f"| {name} | {' | '.join(cells)} | {secs:.0f} |")
    print(f"(seconds: the evaluate command for pretrained rows, the train command for trained; "
          f"runs in {work})")  # fmt: skip


if __name__ == "__main__":
    main()
