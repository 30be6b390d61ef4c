"""Checkpoints of a run: which held-out figures earn best.pt, writing last.pt and best.pt so a
full disk loses nothing, and what a resumed run may change and whether it has anything left
to train."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mltrain.config import LOWER_IS_BETTER, Config, best_metric_k, override_key
from mltrain.errors import ConfigError, MltrainError
from mltrain.files import atomic_save
from mltrain.model.checkpoint import checkpoint_config, load_checkpoint, run_folder
from mltrain.train.loop import StepState

# --- best.pt: which figures win ---------------------------------------------------------------


def better(key: str, new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether `new` beats `old` on `key` (a missing figure never does)."""
    if key not in new:
        return False
    if key not in old:
        return True
    sign = -1.0 if key in LOWER_IS_BETTER else 1.0
    return sign * new[key] > sign * old[key]


def kept_start(best: dict[str, Any]) -> bool:
    """Whether `best` is the untrained model measured at step 0 (`train.eval_start`): no
    evaluated epoch has beaten it, so best.pt holds the starting weights."""
    return bool(best) and best.get("epoch") == 0


def improves(key: str, metrics: dict[str, Any], best: dict[str, Any]) -> bool:
    """Whether an epoch's held-out `metrics` replace best.pt: the untrained start must be
    beaten strictly; between epochs a tie goes to the later one."""
    if key not in metrics:
        return False
    if kept_start(best):
        return better(key, metrics, best)
    return not better(key, best, metrics)


def start_note(key: str, best: dict[str, Any], start: dict[str, Any],
               split: str = "class_disjoint", side: str = "held-out") -> str | None:
    """A note when the best held-out `key` is no better than the untrained model's, so the user
    knows before shipping the result. On unseen classes (class_disjoint) fine-tuning on a few
    others can specialise the backbone away from them; on the training classes' own held-out
    images (per_class, none) it means training did not help. A start already at the metric's
    best possible value leaves nothing to beat: said as such."""
    if key not in start or key not in best or better(key, best, start):
        return None
    if start[key] == (0.0 if key in LOWER_IS_BETTER else 1.0):
        return (f"{side} {key} was already {start[key]:.4f} before training: these {side} "
                "images are too few or too easy to show what training changed; hold out more "
                "images (data.train_fraction) to judge it")  # fmt: skip
    unseen = split == "class_disjoint"
    why = ("training specialised the backbone to the training classes at the held-out ones' "
           "expense; compare with evaluate.py --backbone, " if unseen else
           "training did not help on held-out images of its own classes; ")  # fmt: skip
    kept = (" (best.pt holds the untrained starting weights, epoch 0, so it is never worse "
            "than the start)" if kept_start(best) else "")  # fmt: skip
    return (f"{side} {key} {best[key]:.4f} (best epoch) never beat the untrained model's "
            f"{start[key]:.4f}{kept}: {why}lower the learning rate (e.g. "
            "train.optimizer.args.lr=1e-4), train fewer stages (model.trainable_stages) or add "
            f"training {'classes' if unseen else 'images'}")  # fmt: skip


def check_best_metric_fits(cfg: Config, heldout: int) -> None:
    """Before training: a precision/recall@k that a held-out set this small cannot compute
    would never pick a best.pt."""
    k, most = best_metric_k(cfg.train.best_metric), max(heldout - 1, 1)  # see `usable_ks`
    if k is not None and k > most:
        raise ConfigError(
            f"train.best_metric: {cfg.train.best_metric} needs {k + 1} or more held-out images; "
            f"this split holds {heldout}: choose a k of at most {most}, or map_at_r"
        )


# --- writing ----------------------------------------------------------------------------------


def save_checkpoint(ckpt: dict[str, Any], run_dir: Path, name: str) -> Path:
    """`atomic_save` into checkpoints/: a failed write (full disk, lost permissions) leaves the
    file there as it was, and the error says so and how to go on."""
    path = run_dir / "checkpoints" / name
    try:
        atomic_save(ckpt, path)
    except OSError as e:
        last = run_dir / "checkpoints" / "last.pt"
        if last.is_file():
            then = f"{last} is intact; free space and continue with --resume {run_dir}"
        else:
            then = "no checkpoint was saved before this one; free space and start again"
        reason = e.strerror or e
        raise MltrainError(f"cannot write checkpoint {path} ({reason}); {then}") from None
    return path


def position(state: StepState) -> str:
    """Where a run stands, as messages say it: an epoch boundary or a batch inside one."""
    if state.batches_done:
        return f"in epoch {state.epoch + 1} after batch {state.batches_done}, step {state.step}"
    return f"at epoch {state.epoch}, step {state.step}"


# --- resuming ---------------------------------------------------------------------------------

# What may change when a run resumes: where its images are (the split check still requires the
# same ones), how it loads them, where it runs, and how it is evaluated. The rest would make
# "continues exactly" untrue (an optimizer or schedule restored from the checkpoint would
# silently keep the old values).
RESUME_OVERRIDES = ("data.root", "data.num_workers", "train.device", "eval.")
# eval settings that change the scale of the held-out figures the best checkpoint is judged on
RESUME_FIXED = ("eval.metric", "eval.flip_tta")


def check_resume_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = override_key(item)
        allowed = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_OVERRIDES)
        if not allowed or key in RESUME_FIXED:
            raise ConfigError(
                f"--set {key}: --resume continues the run exactly, so only "
                f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUME_OVERRIDES)} "
                f"(not {', '.join(RESUME_FIXED)}) may change; start a new run to change it"
            )


def open_resume(
    resume: str | Path, overrides: list[str]
) -> tuple[dict[str, Any], Config, Path, bool]:
    """The checkpoint to continue, its config (with the allowed `overrides`), its run folder,
    and whether that run already finished (then a note says so: nothing is rebuilt)."""
    check_resume_overrides(overrides)
    ckpt = load_checkpoint(resume)
    cfg = checkpoint_config(ckpt, overrides, f"checkpoint {resume}")
    run_dir = run_folder(resume)
    done = finished(ckpt, cfg, run_dir)
    if done:  # before data checks and prefix cache
        where = position(StepState(**ckpt["state"]))
        print(f"note: {run_dir} already finished ({where}); nothing to train "
              "(to train longer, start a new run). Its summary:", file=sys.stderr)  # fmt: skip
    return ckpt, cfg, run_dir, done


def past_max_steps(step: int, cfg: Config) -> bool:
    return cfg.train.max_steps is not None and step >= cfg.train.max_steps


def trained_all(epoch: int, step: int, cfg: Config) -> bool:
    """Whether a run at this epoch and step has trained all its epochs (or its max_steps)."""
    return epoch >= cfg.train.epochs or past_max_steps(step, cfg)


def finished(ckpt: dict[str, Any], cfg: Config, run_dir: Path) -> bool:
    """Whether a checkpoint's run ended, summary written (one killed before `metrics.json` is
    rebuilt, as before, to write it)."""
    state = ckpt.get("state") or {}
    return (
        not state.get("batches_done")
        and trained_all(state.get("epoch", 0), state.get("step", 0), cfg)
        and (run_dir / "metrics.json").is_file()
    )
