"""Train an embedding model: python -m mltrain train --config configs/siamese.yaml [--set k=v]
(python train.py takes the same arguments)."""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from mltrain.commands.common import add_config_args, parse_config_args, run_main
from mltrain.config import load_config
from mltrain.errors import ConfigError
from mltrain.text import counted


def summary_line(run_dir: Path) -> str:
    s = json.loads((run_dir / "metrics.json").read_text())
    best = s.get("best") or {}
    key = s.get("best_metric", "map_at_r")
    names = {"map_at_r": "MAP@R", "precision_at_1": "precision@1", "eer": "EER",
             "roc_auc": "ROC AUC"}  # fmt: skip
    shown = [(k, names.get(k, k)) for k in dict.fromkeys(("map_at_r", "precision_at_1", "eer",
                                                          key)) if k in best]  # fmt: skip
    side = "validation" if s.get("selected_on") == "validation" else "held-out"
    epoch = f"epoch {best.get('epoch')}"
    epoch = "the untrained start, epoch 0" if best.get("epoch") == 0 else epoch
    after = [w for w, on in (("the whitening fitted after training", "whiten_dims" in best),
                             ("mirror averaging", best.get("flip_tta"))) if on]  # fmt: skip
    if after:  # the figures are the epoch's with these, not its epoch line's
        epoch += f" with {' and '.join(after)}"
    p1 = (
        f", best {side} {', '.join(f'{n} {best[k]:.4f}' for k, n in shown)} "
        f"({epoch}, picked by {key}"
        + (", starting BatchNorm statistics" if best.get("pretrained_bn_stats") else "")
        + ")"
        if shown
        else ""
    )
    took = f"{s['setup_seconds']:.0f} s setup + {s['train_seconds']:.0f} s training"
    return f"done: {counted(s['epochs'], 'epoch')}, {counted(s['steps'], 'step')} ({took}){p1}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mltrain train", description=__doc__)
    add_config_args(p)
    p.add_argument("--resume", help="run folder or checkpoint to continue exactly")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_config_args(parser(), argv)
    from mltrain.train.run import fit  # heavy imports after argument errors

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes its config from the checkpoint; drop --config")
        run_dir = fit(resume=args.resume, overrides=args.overrides)
    else:
        run_dir = fit(load_config(args.config, args.overrides))
    from mltrain.distributed import is_main

    if is_main():
        print(summary_line(run_dir))
        print(run_dir)  # last line: the run folder, for scripts


if __name__ == "__main__":
    run_main(main)
