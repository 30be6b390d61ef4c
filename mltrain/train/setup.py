"""Before the first step: the run folder, notes on the split, a batch size the data can fill,
the sampler and disk space checked, the model placed. Each check fails in seconds, before the
prefix cache or an epoch is spent."""

from __future__ import annotations

import contextlib
import random
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from mltrain import distributed
from mltrain.config import Config, save_config
from mltrain.data.pipeline import RunData, report_notes, validation_note
from mltrain.data.samplers import build_sampler, fit_batch_size
from mltrain.errors import MltrainError
from mltrain.files import check_free_space, check_writable, size_text
from mltrain.model.network import EmbeddingModel
from mltrain.model.precision import depthwise_in_fp32
from mltrain.train.disk import checkpoint_bytes, prefix_bytes_per_image, run_space_needs
from mltrain.train.prefix_cache import cache_dir, cache_limit

SPLIT_NONE_NOTE = (
    "data.split: none trains on every image, so its held-out figures (and the pick of "
    "best.pt) are measured on the training images themselves: they show fit, not how the "
    "model does on new images; per_class or class_disjoint hold images out"
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def new_run_dir(cfg: Config) -> Path:
    """A new run folder `<output_dir>/<name>/<time>[-N]`. The name is taken by `mkdir`
    itself, so two runs started in the same second get different folders."""
    base = Path(cfg.output_dir) / cfg.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 1
    todo = "make it writable or set output_dir to another folder"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
        (run_dir / "checkpoints").mkdir()
    except OSError as e:
        raise MltrainError(f"output_dir: cannot write to {run_dir} ({e}); {todo}") from None
    try:
        check_writable(run_dir / "checkpoints", f"output_dir: {todo}")
    except MltrainError:
        shutil.rmtree(run_dir, ignore_errors=True)  # no stub folder for a run that never began
        raise
    return run_dir


def remove_if_stub(run_dir: Path) -> None:
    """A new run that failed before its first checkpoint holds nothing to resume (its config,
    split and an empty checkpoints/): remove it, so failed attempts leave no stub folders.
    One that listed unreadable images keeps that list (`bad_images.txt`) and its config."""
    if any((run_dir / "checkpoints").glob("*.pt")):
        return
    if (run_dir / "bad_images.txt").is_file():
        with contextlib.suppress(OSError):
            (run_dir / "checkpoints").rmdir()
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # <output_dir>/<name> when this was its only run
        run_dir.parent.rmdir()


def report_split_notes(cfg: Config, data: RunData, notes_dir: Path | None) -> None:
    """Say when the held-out figures cannot mean what they usually do: no images held out
    (split none), or class_disjoint with no validation classes to pick best.pt on."""
    if cfg.data.split == "none":
        report_notes([SPLIT_NONE_NOTE], notes_dir)
    split = data.split
    if split.kind == "class_disjoint" and not len(split.val):
        report_notes([validation_note(data.folder, split, cfg.data.val_fraction)], notes_dir)


def fit_batch_to_data(cfg: Config, data: RunData, run_dir: Path | None) -> None:
    """Shrink a batch the data cannot fill (few classes or images), saying so; the stored
    config records the size that ran, so a resumed run keeps it. `run_dir` None: not the
    main process, which alone writes."""
    t = cfg.train
    asked = t.batch_size
    t.batch_size, notes = fit_batch_size(t.sampler, data.train_labels, t.batch_size,
                                         data.train_classes)  # fmt: skip
    if 0 < t.epochs <= t.freeze_backbone_epochs:
        notes.append(f"train.freeze_backbone_epochs {t.freeze_backbone_epochs} >= train.epochs "
                     f"{t.epochs}: the trunk stays frozen for the whole run; only what "
                     "follows it trains")  # fmt: skip
    if notes and run_dir is not None:
        report_notes(notes, run_dir)
    if t.batch_size != asked and run_dir is not None:
        save_config(cfg, run_dir / "config.yaml")


def check_sampler(cfg: Config, data: RunData, resuming: bool) -> None:
    """A bad sampler argument fails here, before the prefix cache, not in the first epoch.
    A run resumed from before the random sampler refused arguments drops them: they did
    nothing then either."""
    t = cfg.train
    if resuming and t.sampler.get("name") == "random" and t.sampler.get("args"):
        t.sampler = {"name": "random"}
    build_sampler(t.sampler, data.train_labels, t.batch_size, cfg.seed, data.train_groups)


def check_disk_space(
    cfg: Config, data: RunData, model: EmbeddingModel, loss: torch.nn.Module, dcfg: dict,
    run_dir: Path,
) -> None:  # fmt: skip
    """Free space for the checkpoints (and the prefix cache) on the disks they go to; the
    estimate is described in `mltrain.train.disk`."""
    cache = None
    if cfg.train.cache_frozen and model.frozen_stages > 0:
        split = data.split
        images = len(data.train_rows) * cfg.train.cache_views + len(split.selection)
        per_image = prefix_bytes_per_image(model, tuple(dcfg["input_size"]))
        need, limit = images * per_image, cache_limit()  # a bad MLTRAIN_CACHE_GB fails here
        cache = (cache_dir(), need)
        if need > limit:
            report_notes([f"this run's prefix cache entries (about {size_text(need)}) exceed "
                          f"the cache's cap of {size_text(limit)} (MLTRAIN_CACHE_GB): later "
                          "runs will compute them again; raise MLTRAIN_CACHE_GB to keep them"],
                         run_dir)  # fmt: skip
    size = checkpoint_bytes([model, loss])
    check_free_space(run_space_needs(run_dir, size, cache))


def place_model(
    cfg: Config, model: EmbeddingModel, loss: torch.nn.Module, device: torch.device
) -> None:
    """Model and loss (its proxies or centres) on the device, in the layout training runs
    fastest in: channels-last, and 5x5 depthwise convolutions in fp32 under CPU bf16."""
    model.to(device)
    loss.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.depthwise_fp32:
        depthwise_in_fp32(model)


def distributed_net(cfg: Config, model: EmbeddingModel) -> torch.nn.Module:
    """The module the steps call: the model, or under torchrun its DistributedDataParallel
    wrapper. BatchNorm statistics stay per rank (see README)."""
    if distributed.world()[1] == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=cfg.train.freeze_backbone_epochs > 0
    )
