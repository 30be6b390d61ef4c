"""Where a command's model comes from, said the same way by every command: a training
checkpoint (`--checkpoint`, its own config, `--set` to change it) or an untrained timm
backbone (`--backbone NAME --config CFG`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mltrain.cli import add_config_args
from mltrain.errors import ConfigError


def add_source_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--checkpoint",
                        help="a training checkpoint (.pt), or a run folder (its best.pt)")
    parser.add_argument("--backbone", help="a pretrained timm backbone, untrained")


def embedder_from_args(args: argparse.Namespace):
    """(embedder, the folder results belong under, a description of the source)."""
    if bool(args.checkpoint) == bool(args.backbone):
        raise ConfigError("give exactly one of --checkpoint or --backbone")
    from mltrain.config import load_config
    from mltrain.inference.embedder import embedder_from_backbone, embedder_from_checkpoint

    if args.checkpoint:
        if args.config:
            raise ConfigError("--checkpoint carries its own config; use --set to change it")
        embedder = embedder_from_checkpoint(args.checkpoint, args.overrides)
        ckpt = Path(args.checkpoint)
        base = ckpt if ckpt.is_dir() else ckpt.resolve().parent.parent
        return embedder, base, f"checkpoint {args.checkpoint}"
    cfg = load_config(args.config, [f"model.backbone={args.backbone}", *args.overrides])
    base = Path(cfg.output_dir) / f"backbone-{args.backbone}"
    return embedder_from_backbone(cfg), base, f"pretrained backbone {args.backbone}"
