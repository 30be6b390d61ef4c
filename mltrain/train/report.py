"""What a run tells as it goes and when it ends: the config and hparams in TensorBoard, one
line on stderr per epoch with its curves in TensorBoard, and `metrics.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from torch.utils.tensorboard import SummaryWriter

from mltrain.config import Config, to_dict
from mltrain.data.pipeline import report_notes
from mltrain.evaluation import tensorboard
from mltrain.train.checkpoints import kept_start, start_note
from mltrain.train.loop import StepState


def log_start(writer: SummaryWriter, cfg: Config, step: int) -> None:
    """The config as text and the hparams summary, at the step training starts from, so the
    run shows in the Text and HParams tabs while it trains."""
    config = to_dict(cfg)
    text = yaml.safe_dump(config, sort_keys=False)
    writer.add_text("config", f"```yaml\n{text}```", step)
    tensorboard.add_hparams(writer, config, step)


def log_untrained(writer: SummaryWriter, start: dict[str, float], side: str = "held-out") -> None:
    """The untrained model's held-out figures at step 0, where the curves start."""
    for tag, v in tensorboard.heldout_scalars(start).items():
        writer.add_scalar(tag, v, 0)
    shown = ", ".join(f"{k} {start[k]:.4f}" for k in ("precision_at_1", "map_at_r"))
    print(f"untrained: {side} {shown}", file=sys.stderr)


def log_epoch(
    writer: SummaryWriter, epoch: int, step: int, stats: dict[str, float],
    metrics: dict[str, float], side: str = "held-out",
) -> None:  # fmt: skip
    """Throughput and the held-out curves at the global step of the epoch's end, the x-axis
    `train/loss` and `train/lr` are logged on per optimizer step; one line on stderr.

    The epoch's mean loss, data wait share and best-so-far figures stay in the history and
    metrics.json: as charts they repeat `train/loss` and the held-out curves."""
    writer.add_scalar("train/images_per_s", stats["images_per_s"], step)
    for tag, v in tensorboard.heldout_scalars(metrics).items():
        writer.add_scalar(tag, v, step)
    shown = ", ".join(
        f"{k} {metrics[k]:.4f}" for k in ("precision_at_1", "map_at_r") if k in metrics
    )
    wait = stats.get("data_wait_share")
    print(
        f"epoch {epoch}: loss {stats['loss']:.4f}, {stats['images_per_s']:.1f} img/s"
        + (f" ({wait:.0%} waiting for data)" if wait is not None and wait >= 0.2 else "")
        + (f", {side} {shown}" if shown else "")
        + (" (starting BatchNorm statistics)" if metrics.get("pretrained_bn_stats") else ""),
        file=sys.stderr,
        flush=True,
    )


def write_summary(
    run_dir: Path, cfg: Config, state: StepState, best: dict[str, Any], start: dict[str, Any],
    validation: bool, seconds: tuple[float, float],
) -> None:  # fmt: skip
    """`metrics.json`: the last and best epochs' figures, the untrained start, counts,
    `seconds` (setup, training) and every note of the run (and of its resumed parts). A
    best that never beat the start is said first."""
    summary = {
        "final": state.history[-1] if state.history else {},
        "best": best,
        "best_metric": cfg.train.best_metric,
        "start": start,  # held-out metrics before training (train.eval_start)
        "best_is_start": kept_start(best),  # best.pt holds the untrained weights
        # the images best, start and the held-out curve are measured on (data.val_fraction)
        "selected_on": "validation" if validation else "heldout",
        "epochs": state.epoch,
        "steps": state.step,
        "bad_steps": state.bad_steps_total,
        "setup_seconds": seconds[0],  # data checks, model, prefix cache
        "train_seconds": seconds[1],
    }
    side = "validation" if validation else "held-out"
    note = start_note(cfg.train.best_metric, best, start, cfg.data.split, side)
    if note:
        report_notes([note], run_dir)
    notes = run_dir / "notes.txt"
    if notes.is_file():
        summary["notes"] = list(dict.fromkeys(notes.read_text(encoding="utf-8").splitlines()))
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
