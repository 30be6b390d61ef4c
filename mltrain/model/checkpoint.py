"""Reading checkpoints safely (`weights_only=True`: no arbitrary pickles); `mltrain.files`
writes them crash-safely."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mltrain.config import Config, apply_overrides, from_dict, to_dict
from mltrain.errors import CheckpointError

CHECKPOINT_FORMAT = 1  # the layout of a training checkpoint's dict


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint found and read once, for everything a command does with it: `given` as
    the user wrote it (messages name it; `str()` gives it), the .pt `file` it resolved to, the
    `run` folder it belongs to (results, its split.json) and its contents `data`."""

    given: str
    file: Path
    run: Path
    data: dict[str, Any] = field(repr=False)

    def __str__(self) -> str:
        return self.given

    def config(self, overrides: list[str] | None = None) -> Config:
        """The stored config for inference, here: `overrides` on top, the `MACHINE_KEYS`
        at this machine's defaults (see `checkpoint_config`)."""
        return checkpoint_config(self.data, overrides, f"config stored in checkpoint "
                                 f"{self.given}", elsewhere=True)  # fmt: skip


def open_checkpoint(path: str | Path, prefer: str = "best.pt") -> Checkpoint:
    """`path` (a .pt file, or a run folder: its `prefer` checkpoint) resolved and loaded once."""
    file = checkpoint_file(path, prefer)
    return Checkpoint(str(path), file, run_folder(path), _read(file))


def load_checkpoint(path: str | Path, prefer: str = "last.pt") -> dict[str, Any]:
    """Load a checkpoint written by `atomic_save`, refusing anything but tensors and plain data.
    A run folder means its `prefer` checkpoint (see `resolve_checkpoint`)."""
    return _read(checkpoint_file(path, prefer))


def checkpoint_file(path: str | Path, prefer: str = "last.pt") -> Path:
    """The regular file `path` names: itself, or a run folder's `prefer` checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = resolve_checkpoint(path, prefer)
    if not path.is_file():
        if path.exists():  # a FIFO or device would hang the read
            raise CheckpointError(f"checkpoint {path} is not a regular file; pass a .pt file")
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        if _reads_as_text(path):  # only once refused: the guess never blocks a real load
            raise CheckpointError(
                f"{path} is a text file, not a checkpoint; pass a .pt file (a run's "
                "checkpoints/best.pt) or its run folder"
            ) from None
        raise CheckpointError(
            f"{path} is not a loadable mltrain checkpoint ({load_error_reason(e)}); "
            "it may be corrupt, truncated or unsafe"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not an mltrain checkpoint (no model/config inside)")
    return ckpt


# torch's legacy format opens with this number; at pickle protocol 0 it is printable text.
_TORCH_LEGACY_TEXT = b"L119547037146038801333356L"


def _reads_as_text(path: Path) -> bool:
    """A config.yaml or notes file given as checkpoint: printable UTF-8 from the first byte
    (a byte-order mark allowed). torch files are zip archives or binary pickles; a protocol-0
    pickle reads as text too, and is refused by the safe loader all the same."""
    with open(path, "rb") as f:
        head = f.read(512).removeprefix(b"\xef\xbb\xbf")
    if head.startswith(_TORCH_LEGACY_TEXT):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of the 512 bytes is fine
        if e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)


def load_error_reason(e: Exception) -> str:
    """Why `torch.load(..., weights_only=True)` refused a file, in one short clause.

    torch's own text for a refused pickle advises retrying with `weights_only=False`, which
    would run whatever code the file carries; that advice is never passed on. Only the line
    naming what was refused is kept.
    """
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
        lines = [line.strip() for line in text.splitlines()]
        what = next((x for x in lines if x.startswith(("Trying to load", "Unsupported"))), "")
        return ("it holds Python objects other than tensors and plain data, or is no torch "
                "file at all; refused by the safe loader, nothing in it ran"
                + (f": {what[:200]}" if what else ""))  # fmt: skip
    first = (text.splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def run_folder(path: str | Path) -> Path:
    """The run a checkpoint belongs to: the folder itself, the one above checkpoints/, or for
    a file elsewhere (a downloaded `model.pt`) the folder holding it, so that results land
    beside it and not one folder up."""
    path = Path(path)
    if path.is_dir():  # a run's checkpoints/ folder belongs to the run above it
        return path.parent if _in_run(path) else path
    parent = path.resolve().parent
    return parent.parent if _in_run(parent) else parent


def _in_run(folder: Path) -> bool:
    """Whether `folder` is a run's checkpoints/ (beside the config.yaml every run writes)."""
    return folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file()


def resolve_checkpoint(path: str | Path, prefer: str = "last.pt") -> Path:
    """A run folder or its checkpoints/ folder means its `prefer` checkpoint, else `last.pt`:
    resuming continues from last.pt; evaluating and exporting want best.pt, the epoch the run
    judged best on held-out images."""
    path = Path(path)
    for name in dict.fromkeys((prefer, "last.pt")):
        for candidate in (path / "checkpoints" / name, path / name):
            if candidate.is_file():
                return candidate
    runs = sorted({p.parent.parent for p in path.glob("*/checkpoints/*.pt")})
    if runs:  # the folder of a config's `name`, holding timestamped runs
        raise CheckpointError(
            f"{path} holds {len(runs)} run folder(s), not a checkpoint; pass one, "
            f"e.g. {runs[-1]} (the latest)"
        )
    if (path / "manifest.json").is_file():
        raise CheckpointError(
            f"{path} is a search bundle, not a training run; search it with `mltrain search "
            f"{path} IMAGE`, or pass a run folder or .pt file"
        )
    raise CheckpointError(f"no checkpoints/{prefer} under {path}; pass a .pt file or a run folder")


# Settings of the machine a run trained on, not of its model. A checkpoint opened for inference
# elsewhere (trained on a GPU with 7 loader workers, evaluated on a 2-core laptop) takes this
# machine's defaults for them; `--set` still names them.
MACHINE_KEYS = (("train", "device"), ("data", "num_workers"), ("eval", "backend"))


def checkpoint_config(
    ckpt: dict[str, Any], overrides: list[str] | None, source: str, elsewhere: bool = False
) -> Config:
    """The config a checkpoint was trained with, `--set` overrides on top: resuming and
    evaluating read a checkpoint's settings the same way. With `elsewhere` (inference, which
    may run on another machine) the `MACHINE_KEYS` start from their defaults. `ckpt` is left
    unchanged."""
    data = copy.deepcopy(ckpt["config"])
    if elsewhere:
        data = for_this_machine(data)
    if overrides:  # a mistake in them is the user's, not the checkpoint's: say both
        data = apply_overrides(data, overrides)
    return from_dict(data, source, overrides)


def for_this_machine(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config (plain data, changed in place) with the `MACHINE_KEYS` at their
    defaults: for checkpoints and bundles opened on a machine they may not have come from."""
    defaults = to_dict(Config())
    for section, key in MACHINE_KEYS:
        if isinstance(config.get(section), dict):
            config[section][key] = defaults[section][key]
    return config
