"""One-shot on real domains unlike ImageNet photos: pretrained against trained, as a user runs it.

Measures the real sets in ../shared/data (see its README) with the whole commands, unseen
classes only:

- `omniglot`: handwriting, alphabet-disjoint, as `configs/handwriting.yaml` ships: whole
  alphabets train, validate and test (`data.split_by: parent`; `--seed N` draws another
  split, seed 0 tests Greek and Korean), with 5- and 20-way one-shot drawn from one alphabet
  at a time (`one_shot_within_parent`) as well as from all of them.
- `omniglot-5+3`: an earlier fixed split, copied into two folders: five alphabets train
  (Greek, Japanese_(katakana), Latin, Sanskrit, Tagalog: 156 characters; 15% of them are held
  out to pick best.pt), three are the test (Balinese, Early_Aramaic, Korean: 86 characters).
- `omniglot-chars`: character-disjoint over all 8 alphabets (`data.split=class_disjoint
  data.train_fraction=0.8`; the test characters' alphabets are seen in training).
- `AR`, `GeorgiaTech`, `UMIST`, `IMM`: faces, people-disjoint (`data.train_fraction=0.75`;
  validation people pick best.pt, `data.val_fraction: auto`), verification (ROC AUC, EER).
- `coil20`: objects on a turntable, object-disjoint (0.75).
- `drawings`: generated line drawings (a fast smoke path; no data needed).

For each set and config it runs

    python evaluate.py --backbone BACKBONE --config CFG --set data.root=TEST ...
    python train.py --config CFG --set data.root=TRAIN --set data.split=class_disjoint ...
    python evaluate.py --checkpoint <run>/checkpoints/best.pt [--set data.root=TEST ...]

(BACKBONE: the config's `model.backbone`) and prints a table (one row per model, with the
command). Usage:

    python benchmarks/second_domain.py --sets IMM UMIST           # configs/siamese.yaml
    python benchmarks/second_domain.py --sets AR --configs siamese triplet
    python benchmarks/second_domain.py --sets omniglot --seed 1    # configs/handwriting.yaml
    python benchmarks/second_domain.py --sets drawings            # smoke: generated drawings

Figures measured with it are in docs/results-real-data.md.

`--root DIR --train-fraction F` runs the class-disjoint protocol on your own folder instead
(`--sets` is then ignored; Caltech101: `--root ../shared/data/101_ObjectCategories.tar.gz
--train-fraction 0.505`, 51 classes train and 50 are unseen).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OMNIGLOT_TRAIN = ["Greek", "Japanese_(katakana)", "Latin", "Sanskrit", "Tagalog"]
OMNIGLOT_TEST = ["Balinese", "Early_Aramaic", "Korean"]
# set -> (archive, folder inside it, class-disjoint train fraction, default config)
SETS = {
    "omniglot": ("omniglot_background_small.tar.gz", "omniglot_background", 0.75,
                 "handwriting"),
    "omniglot-5+3": ("omniglot_background_small.tar.gz", "omniglot_background", 0.85,
                     "siamese"),
    "omniglot-chars": ("omniglot_background_small.tar.gz", "omniglot_background", 0.8,
                       "siamese"),
    "AR": ("faces_small.tar.gz", "faces_small/AR", 0.75, "siamese"),
    "GeorgiaTech": ("faces_small.tar.gz", "faces_small/GeorgiaTech", 0.75, "siamese"),
    "UMIST": ("faces_small.tar.gz", "faces_small/UMIST", 0.75, "siamese"),
    "IMM": ("faces_small.tar.gz", "faces_small/IMM", 0.75, "siamese"),
    "coil20": ("coil20.tar.gz", "coil20", 0.75, "siamese"),
    "drawings": (None, None, 0.8, "siamese"),
}  # fmt: skip
CUSTOM = (None, None, 0.8, "siamese")  # --root: your own folder


def run(args: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1], time.perf_counter() - start


def figures(eval_dir: Path) -> dict[str, float | None]:
    m = json.loads((eval_dir / "metrics.json").read_text())
    ver, shots = m.get("verification") or {}, m.get("one_shot") or {}
    within = m.get("one_shot_within_parent") or {}
    return {"5-way": shots.get("5"), "20-way": shots.get("20"), "5-within": within.get("5"),
            "20-within": within.get("20"), "roc_auc": ver.get("roc_auc"), "eer": ver.get("eer"),
            "map_at_r": m["map_at_r"]}  # fmt: skip


def extract(data: Path, archive: str, inner: str, work: Path) -> Path:
    """The set's folder, extracted once under `work` (archives are read as distributed)."""
    target = work / inner
    if not (work / f".{archive}.done").exists():
        with tarfile.open(data / archive) as tar:
            tar.extractall(work, filter="data")
        (work / f".{archive}.done").touch()
    if not target.is_dir():
        raise SystemExit(f"{data / archive} holds no {inner}/")
    return target


def omniglot_alphabets(folder: Path, work: Path) -> tuple[Path, Path]:
    """Copies of the training and test alphabets (symlinked folders are not followed)."""
    roots = work / "omniglot_train_alphabets", work / "omniglot_test_alphabets"
    for root, names in zip(roots, (OMNIGLOT_TRAIN, OMNIGLOT_TEST), strict=True):
        for name in names:
            if not (root / name).is_dir():
                shutil.copytree(folder / name, root / name)
    return roots


def backbone(mode: str, overrides: list[str]) -> str:
    """The backbone `configs/{mode}.yaml` trains with `overrides`: the pretrained row's."""
    from mltrain.config import load_config

    return load_config(REPO / "configs" / f"{mode}.yaml", overrides).model.backbone


def plan(name: str, data: Path, work: Path, args: argparse.Namespace):
    """(train flags, test flags for evaluate, train fraction) for one set."""
    archive, inner, fraction, _ = SETS.get(name, CUSTOM)
    if args.root:
        root = Path(args.root).resolve()
    elif name == "drawings":
        from tests.foreign_data import write_drawings

        root = write_drawings(work / "drawings", args.alphabets, args.chars, args.per_class)
    elif name == "omniglot":  # the archive itself, as configs/handwriting.yaml reads it
        root = data / archive
    else:
        root = extract(data, archive, inner, work)
    fraction = args.train_fraction or fraction
    split = ["--set", "data.split=class_disjoint", "--set", f"data.train_fraction={fraction}"]
    if name == "omniglot-5+3" and not args.root:
        train_root, test_root = omniglot_alphabets(root, work)
        # held-out characters of the training alphabets pick best.pt; the test alphabets are
        # evaluated whole (data.split none: none of their images trained)
        train = ["--set", f"data.root={train_root}", *split, "--set", "data.val_fraction=0"]
        test = ["--set", f"data.root={test_root}", "--set", "data.split=none"]
        return train, test
    if name == "omniglot":  # whole alphabets, whatever the config
        split += ["--set", "data.split_by=parent"]
    train = ["--set", f"data.root={root}", *split]
    return train, None


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sets", nargs="+", default=["IMM", "UMIST", "GeorgiaTech", "AR", "omniglot"],
                   choices=sorted(SETS))  # fmt: skip
    p.add_argument("--configs", nargs="+", help="config names in configs/ (default: siamese)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                   help="folder holding the archives")  # fmt: skip
    p.add_argument("--work", help="where archives are extracted and runs written (default: temp)")
    p.add_argument("--root", help="your own folder instead (one set, class-disjoint)")
    p.add_argument("--train-fraction", type=float, help="share of classes on the training side")
    p.add_argument("--seed", type=int, help="the run's seed, which also draws the split")
    p.add_argument("--no-pretrained", action="store_true", help="skip the untrained rows")
    p.add_argument("--alphabets", type=int, default=10, help="drawings: alphabets")
    p.add_argument("--chars", type=int, default=12, help="drawings: characters each")
    p.add_argument("--per-class", type=int, default=15, help="drawings: images each")
    p.add_argument("--set", dest="extra", action="append", default=[], help="train override")
    p.add_argument("--eval-set", dest="eval_extra", action="append", default=[],
                   help="evaluate override, e.g. eval.tsne=false")  # fmt: skip
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mltrain-domain-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    flags = lambda key, sets: [a for s in sets for a in (key, s)]  # noqa: E731
    evals = flags("--set", ["eval.tsne=false", "eval.rerank=false", *args.eval_extra])
    seed = ["--set", f"seed={args.seed}"] if args.seed is not None else []
    rows = []
    for name in ["custom"] if args.root else args.sets:
        train, test = plan(name, data, work, args)
        for mode in args.configs or [SETS.get(name, CUSTOM)[3]]:
            cfg = ["--config", f"configs/{mode}.yaml"]
            where = test or train
            if not args.no_pretrained:
                cmd = ["evaluate.py", "--backbone", backbone(mode, args.extra), *cfg, *where,
                       *seed, *evals]  # fmt: skip
                out, secs = run(cmd)
                rows.append((name, f"{mode}: pretrained", figures(Path(out.removeprefix(
                    "results: "))), secs, cmd))  # fmt: skip
            cmd = ["train.py", *cfg, *train, *seed, "--set", f"output_dir={work / 'exp'}",
                   "--set", f"name={name}-{mode}", *flags("--set", args.extra)]  # fmt: skip
            run_dir, train_s = run(cmd)
            out, _ = run(["evaluate.py", "--checkpoint", f"{run_dir}/checkpoints/best.pt",
                          *(test or []), *evals])  # fmt: skip
            rows.append((name, f"{mode}: trained", figures(Path(out.removeprefix("results: "))),
                         train_s, cmd))  # fmt: skip
            print(f"{name} {mode}: trained in {train_s:.0f} s, {run_dir}", flush=True)
    keys = ("5-way", "20-way", "5-within", "20-within", "roc_auc", "eer", "map_at_r")
    print("| set | model | 5-way | 20-way | 5-way within | 20-way within | ROC AUC | EER | MAP@R "
          "| seconds | command |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, model, f, secs, cmd in rows:
        cells = [f"{f[k]:.4f}" if f[k] is not None else "–" for k in keys]
        print(f"| {name} | {model} | {' | '.join(cells)} | {secs:.0f} | "
              f"`python {' '.join(cmd)}` |")  # fmt: skip
    print(f"(seconds: the evaluate command for pretrained rows, the train command for trained; "
          f"within: each episode's classes from one alphabet; runs in {work})")  # fmt: skip


if __name__ == "__main__":
    main()
