"""Where a command's model comes from, said the same way by every command: a training
checkpoint (`--checkpoint`, its own config, `--set` to change it) or an untrained timm
backbone (`--backbone NAME --config CFG`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mltrain.commands.common import add_config_args
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
    from mltrain.inference.embedder import embedder_from_backbone
    from mltrain.model.checkpoint import run_folder

    check_inference_overrides(args.overrides, command)
    if args.checkpoint:
        if args.config:
            raise ConfigError("--checkpoint carries its own config; use --set to change it")
        if len(args.checkpoint) > 1:
            return _ensemble(args, ensemble)
        embedder = checkpoint_embedder(args.checkpoint[0], args.overrides)
        return embedder, run_folder(args.checkpoint[0]), f"checkpoint {args.checkpoint[0]}"
    cfg = load_config(args.config, [f"model.backbone={args.backbone}", *args.overrides])
    base = Path(cfg.output_dir) / f"backbone-{args.backbone}"
    return embedder_from_backbone(cfg), base, f"pretrained backbone {args.backbone}"


def checkpoint_embedder(path: str, overrides: list[str]):
    """The embedder a checkpoint rebuilds, where its stored config may not fit this version
    of mltrain (a value this code refuses, e.g. more frozen stages than the backbone now
    splits into). A key only training reads cannot change an embedding: it is read at its
    default, with a note. Any other mismatch is one line naming the checkpoint and the
    `--set` that overrides the stored value (the checkpoint file itself is never edited)."""
    from mltrain.config import Config, is_training_only, to_dict
    from mltrain.inference.embedder import embedder_from_checkpoint

    resets: list[str] = []
    while True:
        try:
            return embedder_from_checkpoint(path, [*overrides, *resets])
        except ConfigError as e:
            message = str(e)
            if str(path) in message:  # the stored config, or an override, said so already
                raise
            found = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)+):", message)
            key = found.group(1) if found else "KEY"
            set_already = any(o.startswith(f"{key}=") for o in [*overrides, *resets])
            if not (found and is_training_only(key)) or set_already:
                raise ConfigError(
                    f"checkpoint {path}: its stored config does not fit this version of "
                    f"mltrain ({message}); override the stored value with --set {key}=VALUE "
                    "(the checkpoint is not changed)"
                ) from None
        default: object = to_dict(Config())
        for part in key.split("."):
            default = default.get(part) if isinstance(default, dict) else None
        resets.append(f"{key}={json.dumps(default)}")
        print(f"note: checkpoint {path}: its stored {message.split(';')[0]}; only training "
              f"reads {key}, so it is read at its default ({json.dumps(default)}) here",
              file=sys.stderr)  # fmt: skip


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


def leave_out_trained(args: argparse.Namespace, data):
    """Before embedding: held-out images a --checkpoint's run trained on or chose best.pt on
    (its split.json's train and val sides) move to the training side, so that no held-out
    figure or calibrated threshold scores them; a note says how many (also in report.md and
    notes.txt). A folder that grew since the run re-splits, and would otherwise inflate every
    figure without a sign. With `data.split: none` every image is evaluated by request: only
    the note."""
    from mltrain.data.pipeline import trained_on, without_rows
    from mltrain.model.checkpoint import resolve_checkpoint, run_folder

    for ckpt in args.checkpoint or []:
        path = Path(ckpt)
        path = path if path.is_file() else resolve_checkpoint(path, prefer="best.pt")
        recorded = run_folder(path) / "split.json"
        rows = trained_on(recorded, data.split, data.folder)
        if not len(rows):
            continue
        held, every = len(data.split.heldout), data.split.kind == "none"
        example = data.folder.paths[rows[0]].relative_to(data.folder.root).as_posix()
        what = (f"{len(rows)} of the {held} {'images' if every else 'held-out images'} trained "
                f"{ckpt} (its {recorded} lists them, e.g. {example})")  # fmt: skip
        if every:
            note = f"{what}: with data.split: none the figures are not held-out ones"
        else:
            data = without_rows(data, rows)
            note = (f"{what}: the folder or the split differs from the run's, so they are left "
                    f"out of the held-out images; {len(data.split.heldout)} remain")  # fmt: skip
        print(f"note: {note}", file=sys.stderr)
        data.folder.notes.append(note)
    return data
