"""Where a command's model comes from, said the same way by every command: a training
checkpoint (`--checkpoint`, its own config, `--set` to change it) or an untrained timm
backbone (`--backbone NAME --config CFG`). A checkpoint is resolved and read once
(`mltrain.model.checkpoint.Checkpoint`), and its config worked out once, for everything the
command does with it."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mltrain.commands.common import add_config_args
from mltrain.errors import ConfigError

if TYPE_CHECKING:  # the model layer is imported when a command runs, not for its --help
    from mltrain.model.checkpoint import Checkpoint


def add_source_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--checkpoint", action="append",
                        help="a training checkpoint (.pt), or a run folder (its best.pt); evaluate "
                             "takes several, for an ensemble of runs on one split")
    parser.add_argument("--backbone", help="a pretrained timm backbone, untrained")


@dataclass
class ModelSource:
    """The model a command embeds with: the `embedder`, the folder its results belong under
    (`base`), how reports name it (`text`) and the checkpoints it came from, opened once
    (none for a backbone)."""

    embedder: Any  # an Embedder, or an EnsembleEmbedder for several checkpoints
    base: Path
    text: str
    checkpoints: list[Checkpoint] = field(default_factory=list)


def embedder_from_args(args: argparse.Namespace, command: str,
                       ensemble: bool = False) -> ModelSource:  # fmt: skip
    """The model of `--checkpoint` or `--backbone`. With `ensemble`, several --checkpoint
    flags make an `EnsembleEmbedder`. `--set` keys that only training reads are refused:
    `command` would ignore them."""
    if bool(args.checkpoint) == bool(args.backbone):
        raise ConfigError("give exactly one of --checkpoint or --backbone")
    from mltrain.config import check_inference_overrides, load_config
    from mltrain.inference.embedder import embedder_from_backbone

    check_inference_overrides(args.overrides, command)
    if args.checkpoint:
        if args.config:
            raise ConfigError("--checkpoint carries its own config; use --set to change it")
        if len(args.checkpoint) > 1:
            return _ensemble(args, ensemble)
        from mltrain.model.checkpoint import open_checkpoint

        ck = open_checkpoint(args.checkpoint[0], prefer="best.pt")
        embedder = checkpoint_embedder(ck, args.overrides)
        return ModelSource(embedder, ck.run, f"checkpoint {ck.given}", [ck])
    cfg = load_config(args.config, [f"model.backbone={args.backbone}", *args.overrides])
    base = Path(cfg.output_dir) / f"backbone-{args.backbone}"
    return ModelSource(embedder_from_backbone(cfg), base, f"pretrained backbone {args.backbone}")


def checkpoint_embedder(ck: Checkpoint, overrides: list[str]):
    """The embedder checkpoint `ck` rebuilds, where its stored config may not fit this version
    of mltrain (a value the model refuses, e.g. more frozen stages than the backbone now splits
    into). A mistake in the stored config or an override names the checkpoint already and is
    raised as it is. Building the model names the key it refuses (`ConfigError.key`): a key
    only training reads cannot change an embedding, so it is read at its default, with a
    note; any other is one line naming the checkpoint and the `--set` that overrides the
    stored value (the checkpoint file itself is never edited)."""
    from mltrain.inference.embedder import embedder_from_checkpoint

    resets: list[str] = []
    while True:
        cfg = ck.config([*overrides, *resets])
        try:
            return embedder_from_checkpoint(ck, cfg=cfg)
        except ConfigError as e:
            resets.append(_reset(ck.given, e, [*overrides, *resets]))


def _reset(given: str, e: ConfigError, overrides: list[str]) -> str:
    """The `--set` that reads `e.key` at its default, after a note; or the error of a stored
    config that does not fit, where the key is not one only training reads (or is set already)."""
    from mltrain.config import Config, is_training_only, to_dict

    key, message = e.key, str(e)
    set_already = any(o.startswith(f"{key}=") for o in overrides)
    if key is None or not is_training_only(key) or set_already:
        raise ConfigError(
            f"checkpoint {given}: its stored config does not fit this version of mltrain "
            f"({message}); override the stored value with --set {key or 'KEY'}=VALUE (the "
            "checkpoint is not changed)"
        ) from None
    default: object = to_dict(Config())
    for part in key.split("."):
        default = default.get(part) if isinstance(default, dict) else None
    print(f"note: checkpoint {given}: its stored {message.split(';')[0]}; only training "
          f"reads {key}, so it is read at its default ({json.dumps(default)}) here",
          file=sys.stderr)  # fmt: skip
    return f"{key}={json.dumps(default)}"


def _ensemble(args: argparse.Namespace, allowed: bool) -> ModelSource:
    if not allowed:
        raise ConfigError(
            f"--checkpoint given {len(args.checkpoint)} times; this command takes one (an "
            "ensemble of runs is for evaluate.py, and a bundle holds one model)"
        )
    from mltrain.inference.ensemble import ensemble_from_checkpoints
    from mltrain.model.checkpoint import open_checkpoint

    checkpoints = [open_checkpoint(p, prefer="best.pt") for p in args.checkpoint]
    embedder = ensemble_from_checkpoints(checkpoints, args.overrides)
    base = Path(embedder.cfg.output_dir) / "ensemble"
    text = f"ensemble of checkpoints {', '.join(args.checkpoint)}"
    return ModelSource(embedder, base, text, checkpoints)


def leave_out_trained(source: ModelSource, data):
    """Before embedding: held-out images a checkpoint's run trained on or chose best.pt on
    (its split.json's train and val sides) move to the training side, so that no held-out
    figure or calibrated threshold scores them; a note says how many (also in report.md and
    notes.txt). A folder that grew since the run re-splits, and would otherwise inflate every
    figure without a sign. With `data.split: none` every image is evaluated by request: only
    the note."""
    from mltrain.data.pipeline import trained_on, without_rows

    for ck in source.checkpoints:
        recorded = ck.run / "split.json"
        rows = trained_on(recorded, data.split, data.folder)
        if not len(rows):
            continue
        held, every = len(data.split.heldout), data.split.kind == "none"
        example = data.folder.paths[rows[0]].relative_to(data.folder.root).as_posix()
        what = (f"{len(rows)} of the {held} {'images' if every else 'held-out images'} trained "
                f"{ck.given} (its {recorded} lists them, e.g. {example})")  # fmt: skip
        if every:
            note = f"{what}: with data.split: none the figures are not held-out ones"
        else:
            data = without_rows(data, rows)
            note = (f"{what}: the folder or the split differs from the run's, so they are left "
                    f"out of the held-out images; {len(data.split.heldout)} remain")  # fmt: skip
        print(f"note: {note}", file=sys.stderr)
        data.folder.notes.append(note)
    return data
