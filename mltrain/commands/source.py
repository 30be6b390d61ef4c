"""Where a command's model comes from, said the same way by every command: a training
checkpoint (`--checkpoint`, its own config, `--set` to change it) or an untrained timm
backbone (`--backbone NAME --config CFG`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mltrain.cli import add_config_args
from mltrain.errors import ConfigError


def add_source_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--checkpoint", action="append",
                        help="a training checkpoint (.pt), or a run folder (its best.pt); evaluate "
                             "takes several, for an ensemble of runs on one split")
    parser.add_argument("--backbone", help="a pretrained timm backbone, untrained")


def embedder_from_args(args: argparse.Namespace, command: str, ensemble: bool = False):
    """(embedder, the folder results belong under, a description of the source). With
    `ensemble`, several --checkpoint flags make an `EnsembleEmbedder`. `--set` keys that only
    training reads are refused: `command` would ignore them."""
    if bool(args.checkpoint) == bool(args.backbone):
        raise ConfigError("give exactly one of --checkpoint or --backbone")
    from mltrain.config import check_inference_overrides, load_config
    from mltrain.inference.embedder import embedder_from_backbone, embedder_from_checkpoint
    from mltrain.model.checkpoint import run_folder

    check_inference_overrides(args.overrides, command)
    if args.checkpoint:
        if args.config:
            raise ConfigError("--checkpoint carries its own config; use --set to change it")
        if len(args.checkpoint) > 1:
            return _ensemble(args, ensemble)
        embedder = embedder_from_checkpoint(args.checkpoint[0], args.overrides)
        return embedder, run_folder(args.checkpoint[0]), f"checkpoint {args.checkpoint[0]}"
    cfg = load_config(args.config, [f"model.backbone={args.backbone}", *args.overrides])
    base = Path(cfg.output_dir) / f"backbone-{args.backbone}"
    return embedder_from_backbone(cfg), base, f"pretrained backbone {args.backbone}"


def _ensemble(args: argparse.Namespace, allowed: bool):
    if not allowed:
        raise ConfigError(
            f"--checkpoint given {len(args.checkpoint)} times; this command takes one (an "
            "ensemble of runs is for evaluate.py, and a bundle holds one model)"
        )
    from mltrain.inference.ensemble import ensemble_from_checkpoints

    embedder = ensemble_from_checkpoints(args.checkpoint, args.overrides)
    base = Path(embedder.cfg.output_dir) / "ensemble"
    return embedder, base, f"ensemble of checkpoints {', '.join(args.checkpoint)}"


def check_heldout_unseen(args: argparse.Namespace, data) -> None:
    """Before embedding: no held-out image may be one a --checkpoint's run trained on (its
    split.json says which). With `data.split: none` every image is evaluated by request, so
    that is a note; otherwise the figures would be inflated without a sign, so it is refused."""
    from mltrain.data.pipeline import trained_on
    from mltrain.errors import DataError
    from mltrain.model.checkpoint import resolve_checkpoint, run_folder

    held = len(data.split.heldout)
    every = data.split.kind == "none"
    for ckpt in args.checkpoint or []:
        path = Path(ckpt)
        path = path if path.is_file() else resolve_checkpoint(path, prefer="best.pt")
        recorded = run_folder(path) / "split.json"
        seen = trained_on(recorded, data.split, data.folder)
        if not seen:
            continue
        images = "images evaluated" if every else "held-out images"
        what = f"{len(seen)} of the {held} {images} trained {ckpt} (its {recorded})"
        if every:
            print(f"note: {what}: with data.split: none the figures are not held-out ones",
                  file=sys.stderr)  # fmt: skip
            continue
        raise DataError(f"{what}, e.g. {seen[0]}: data.root or the split differs from the "
                        "run's, so the figures would be inflated; use the run's data.root and "
                        "split, or a folder without its training images")  # fmt: skip
