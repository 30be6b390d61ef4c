"""`fit`: the whole training run, from a config to a run folder with checkpoints and metrics."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import timm.optim
import timm.scheduler
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from mltrain import __version__, distributed
from mltrain.config import (
    LOWER_IS_BETTER,
    Config,
    best_metric_k,
    override_key,
    save_config,
    to_dict,
)
from mltrain.data.archive import absolute_root
from mltrain.data.dataset import make_loader
from mltrain.data.pipeline import (
    CachedFeatures,
    RunData,
    eval_loader,
    prepare_data,
    report_notes,
    train_dataset,
    train_loader,
    validation_note,
)
from mltrain.data.samplers import build_sampler, fit_batch_size
from mltrain.errors import ConfigError, DataError, MltrainError
from mltrain.evaluation import figures, tensorboard
from mltrain.evaluation.metrics import retrieval_metrics, verification_metrics
from mltrain.evaluation.plan import usable_ks
from mltrain.evaluation.tensorboard import HELDOUT
from mltrain.files import atomic_save, check_free_space, check_writable
from mltrain.inference.batching import extract_embeddings
from mltrain.model.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_config,
    load_checkpoint,
    run_folder,
)
from mltrain.model.fusion import fold_batchnorm
from mltrain.model.losses import Criterion, build_criterion
from mltrain.model.network import (
    EmbeddingModel,
    build_model,
    check_backbone_name,
    check_pretrained,
    data_config,
)
from mltrain.model.precision import depthwise_in_fp32
from mltrain.runtime import Runtime, resolve_device
from mltrain.train.disk import checkpoint_bytes, prefix_bytes_per_image, run_space_needs
from mltrain.train.loop import LoopSettings, StepState, compute_prefix, rng_state, train_one_epoch
from mltrain.train.prefix_cache import cache_dir, cached, weights_identity


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


def make_optimizer(
    cfg: Config, model: torch.nn.Module, loss: torch.nn.Module | None = None, strict: bool = True
) -> torch.optim.Optimizer:
    """timm's optimizer over the model (with `train.layer_decay`, earlier layers learn slower),
    plus the loss's own parameters (proxies, class centres) in a group of their own at
    `train.loss_lr`: proxies need about 100x the backbone's rate to keep up with it."""
    t = cfg.train
    args = dict(t.optimizer.get("args") or {})
    name = t.optimizer["name"]
    try:
        optimizer = timm.optim.create_optimizer_v2(
            model, opt=name, layer_decay=t.layer_decay, **args
        )
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(f"train.optimizer: {_optimizer_problem(name, e)}") from None
    owned = [p for p in loss.parameters() if p.requires_grad] if loss is not None else []
    if strict and t.loss_lr is not None and loss is not None and not owned:
        raise ConfigError(
            f"train.loss_lr: {t.loss['name']} has no parameters of its own (proxies, class "
            "centres), so loss_lr would change nothing; remove it"
        )
    if owned:
        base = optimizer.defaults["lr"]  # timm's schedulers scale each group's base by lr_scale
        scale = (t.loss_lr or base) / base
        optimizer.add_param_group({"params": owned, "lr": base, "lr_scale": scale})
    return optimizer


def _optimizer_problem(name: str, e: Exception) -> str:
    """What is wrong, naming only the few names that matter: close matches for an unknown
    optimizer, the accepted arguments for an unknown argument."""
    known = timm.optim.list_optimizers()
    if name.lower().split("_")[-1] not in known and name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
        similar = f"; similar: {', '.join(close)}" if close else ""
        return (f"unknown optimizer {name!r}{similar} (all {len(known)} names: "
                "python -c 'import timm.optim; print(timm.optim.list_optimizers())')")  # fmt: skip
    arg = re.search(r"unexpected keyword argument '(\w+)'", str(e))
    if arg:
        try:
            sig = inspect.signature(timm.optim.get_optimizer_class(name))
            valid = [p for p in sig.parameters if p not in ("self", "params")]
        except Exception:  # noqa: BLE001 - only the hint is lost
            valid = []
        takes = f"; it takes {', '.join(valid)}" if valid else ""
        return f"{name} has no argument {arg.group(1)!r} (train.optimizer.args){takes}"
    return f"{name}: {e}"


def check_optimization(cfg: Config) -> None:
    """Check the backbone name and weights, and build the optimizer and scheduler once for a
    one-parameter model: a bad name or argument fails in milliseconds, before a run folder,
    data checks or a model exist."""
    check_backbone_name(cfg.model.backbone)
    check_pretrained(cfg.model.backbone, cfg.model.pretrained)
    # One parameter has no layers to decay (timm would warn so): layer_decay waits for the model.
    cfg = replace(cfg, train=replace(cfg.train, layer_decay=None))
    try:
        optimizer = make_optimizer(cfg, torch.nn.Linear(1, 1))
        make_scheduler(cfg, optimizer, 1)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - args that need the real model (layer_decay): checked then
        pass


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    args = dict(cfg.train.scheduler.get("args") or {})
    try:
        sched, _ = timm.scheduler.create_scheduler_v2(
            optimizer,
            sched=cfg.train.scheduler["name"],
            num_epochs=cfg.train.epochs,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
            **args,
        )
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(
            f"train.scheduler: {e}; valid names: cosine, step, multistep, plateau, poly, tanh"
        ) from None
    if sched is None:
        raise ConfigError(f"train.scheduler: unknown name {cfg.train.scheduler['name']!r}")
    return sched


SPLIT_NONE_NOTE = (
    "data.split: none trains on every image, so its held-out figures (and the pick of "
    "best.pt) are measured on the training images themselves: they show fit, not how the "
    "model does on new images; per_class or class_disjoint hold images out"
)


class Run:
    """One training run as one object: `__init__` builds data, model, loss, optimizer and
    loaders; `train_epoch` runs an epoch and `evaluate_and_save` judges and checkpoints it;
    `save`, `checkpoint` and `restore` make it resumable. `fit` drives it epoch by epoch."""

    def __init__(self, cfg: Config, run_dir: Path, resuming: bool = False) -> None:
        self.cfg, self.run_dir, self.resuming = cfg, run_dir, resuming
        seed_everything(cfg.seed)
        runtime = Runtime.from_config(cfg)
        self.device, self.amp = runtime.device, runtime.train_amp  # training steps
        self.infer_amp, self.infer_spec = runtime.infer_amp, runtime.infer  # prefix, held-out
        distributed.init(self.device)
        self.main = distributed.is_main()
        self.data: RunData = prepare_data(cfg, run_dir if self.main else None,
                                          resuming=resuming)
        if cfg.data.split == "none":
            report_notes([SPLIT_NONE_NOTE], run_dir if self.main else None)
        split = self.data.split
        if split.kind == "class_disjoint" and not len(split.val):
            note = validation_note(self.data.folder, split, cfg.data.val_fraction)
            report_notes([note], run_dir if self.main else None)
        # the held-out loader, figures and best.pt: the validation side when there is one
        check_best_metric_fits(cfg, len(split.selection))
        self._fit_batch_size()
        self._check_sampler()
        n_classes = len(self.data.train_classes)
        self.model: EmbeddingModel = build_model(cfg.model, num_classes=n_classes)
        # model.bn_stats: the pretrained running statistics, kept aside to evaluate against
        self.pretrained_bn = None
        if cfg.model.bn_stats == "auto" and not cfg.model.freeze_bn:
            self.pretrained_bn = self.model.bn_stats() or None  # none: nothing to choose
        if cfg.model.bn_stats == "pretrained":
            self.model.keep_bn_stats()
        self.dcfg = data_config(self.model, cfg.model)
        self.criterion: Criterion = build_criterion(
            cfg.train.loss, cfg.train.miner, n_classes, self.model.embedding_dim, cfg.model.head,
            hybrid=cfg.model.bnneck,
        )
        self._check_disk_space()  # before the prefix cache and training, not after them
        self.model.to(self.device)
        self.criterion.loss.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.train.depthwise_fp32:
            depthwise_in_fp32(self.model)
        with distributed.main_first():  # rank 0 fills the prefix cache, the others read it
            self._build_loaders()
        self.net = self.model
        if distributed.world()[1] > 1:  # BatchNorm statistics stay per rank (see README)
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=cfg.train.freeze_backbone_epochs > 0
            )
        # a resumed run keeps settings accepted when it started (loss_lr there was inert)
        self.optimizer = make_optimizer(cfg, self.model, self.criterion.loss, strict=not resuming)
        per_epoch = max(len(self.epoch_loader(0)) // cfg.train.grad_accum, 1)
        self.scheduler = make_scheduler(cfg, self.optimizer, per_epoch)
        self.state = StepState()
        self.best: dict[str, Any] = {}
        self.start: dict[str, float] = {}  # held-out metrics before training (train.eval_start)
        self.stop = threading.Event()  # set on SIGINT/SIGTERM: save at the next step boundary
        self.writer = SummaryWriter(str(run_dir)) if self.main else None

    def _fit_batch_size(self) -> None:
        """Shrink a batch the data cannot fill (few classes or images), saying so; the stored
        config records the size that ran, so a resumed run keeps it."""
        t = self.cfg.train
        asked = t.batch_size
        t.batch_size, notes = fit_batch_size(t.sampler, self.data.train_labels, t.batch_size,
                                             self.data.train_classes)  # fmt: skip
        if 0 < t.epochs <= t.freeze_backbone_epochs:
            notes.append(f"train.freeze_backbone_epochs {t.freeze_backbone_epochs} >= train.epochs "
                         f"{t.epochs}: the trunk stays frozen for the whole run; only what "
                         "follows it trains")  # fmt: skip
        if notes and self.main:
            report_notes(notes, self.run_dir)
        if t.batch_size != asked and self.main:
            save_config(self.cfg, self.run_dir / "config.yaml")

    def _check_sampler(self) -> None:
        """A bad sampler argument fails here, before the prefix cache, not in the first epoch.
        A run resumed from before the random sampler refused arguments drops them: they did
        nothing then either."""
        t = self.cfg.train
        if self.resuming and t.sampler.get("name") == "random" and t.sampler.get("args"):
            t.sampler = {"name": "random"}
        build_sampler(t.sampler, self.data.train_labels, t.batch_size, self.cfg.seed)

    def loss(self, emb: torch.Tensor, labels: torch.Tensor, head) -> torch.Tensor:
        """The loss of the global batch (gathered from every rank when distributed)."""
        return self.criterion(*distributed.gather(emb, labels), head)

    def _build_loaders(self) -> None:
        cfg, data = self.cfg, self.data
        heldout = eval_loader(
            cfg, data.paths(data.split.selection), data.folder.labels[data.split.selection],
            self.dcfg,
        )
        # a family with no stage split trains whole (model.trainable_stages): nothing to cache
        self.from_prefix = cfg.train.cache_frozen and self.model.frozen_stages > 0
        if not self.from_prefix:
            self.train_sets = [train_dataset(cfg, data, self.dcfg)]
            self.eval_batches = heldout
            return
        self.train_sets = [self._cache_view(v) for v in range(cfg.train.cache_views)]
        feats = self._prefix(
            "heldout", heldout, "caching held-out prefix", model=self.inference_model()
        )
        self.eval_batches = torch.utils.data.DataLoader(
            CachedFeatures(*feats), batch_size=cfg.eval.batch_size
        )

    def _prefix(self, name: str, loader, desc: str, seed: int | None = None, model=None):
        """Frozen-prefix outputs of a loader's images (through `model`, default the training
        model), via the shared disk cache."""
        cfg, model = self.cfg, self.model if model is None else model
        parts = {
            "backbone": cfg.model.backbone,
            "weights": weights_identity(cfg.model.pretrained),
            "frozen_stages": self.model.frozen_stages,  # resolved from trainable_stages too
            "data_config": self.dcfg,
            "augment": cfg.data.augment if name == "train" else None,
            "seed": seed,
            "amp": str(self.infer_amp),
            "paths": [str(p) for p in loader.dataset.paths],
            "labels": loader.dataset.labels.tolist(),
            "workers": loader.num_workers,
            # 2: chunked forward, in the workers on CPU (mltrain.inference.batching).
            # eval.cpu_chunk and where the model runs move bf16 results by rounding only, so they
            # are not keyed.
            "version": 2,
        }
        if name == "heldout":  # the inference model: BatchNorm folded or not (eval.fold_bn)
            parts["fold_bn"] = model is not self.model
        return cached(
            parts,
            lambda: compute_prefix(model, loader, self.infer_spec, desc),
        )

    def epoch_loader(self, epoch: int):
        dataset = self.train_sets[epoch % len(self.train_sets)]
        return train_loader(self.cfg, self.data, dataset, seed=self.cfg.seed * 1000 + epoch)

    def _cache_view(self, view: int) -> CachedFeatures:
        """One augmented pass over the training images through the frozen prefix."""
        seed = self.cfg.seed * 1000 + 500 + view
        # Augmentation streams follow the worker seeds, so the worker count stays the loader
        # default (at most 4) rather than one per core: the same views on any machine of 4+.
        loader = make_loader(
            train_dataset(self.cfg, self.data, self.dcfg),
            self.cfg.eval.batch_size,
            num_workers=self.cfg.data.num_workers,
            seed=seed,
        )
        return CachedFeatures(
            *self._prefix("train", loader, f"caching train prefix (view {view + 1})", seed)
        )

    def _check_disk_space(self) -> None:
        """Free space for the checkpoints (and the prefix cache) on the disks they go to; the
        estimate is described in `mltrain.train.disk`."""
        cache = None
        if self.cfg.train.cache_frozen and self.model.frozen_stages > 0:
            split = self.data.split
            images = len(split.train) * self.cfg.train.cache_views + len(split.selection)
            per_image = prefix_bytes_per_image(self.model, tuple(self.dcfg["input_size"]))
            cache = (cache_dir(), images * per_image)
        size = checkpoint_bytes([self.model, self.criterion.loss])
        check_free_space(run_space_needs(self.run_dir, size, cache))

    def settings(self) -> LoopSettings:
        t = self.cfg.train
        return LoopSettings(
            device=self.device,
            amp_dtype=self.amp,
            channels_last=t.channels_last,
            grad_accum=t.grad_accum,
            grad_clip=t.grad_clip,
            max_steps=t.max_steps,
            max_bad_steps=t.max_bad_steps,
            from_prefix=self.from_prefix,
            show_progress=self.main,
            stop=self.stop,
        )

    def inference_model(self) -> EmbeddingModel:
        """The model held-out embeddings come from: the one evaluate.py embeds with (see
        `Embedder.forward_model`; with `eval.fold_bn` a copy with BatchNorm folded in).

        Under bf16 autocast folding changes the rounding (embeddings move by up to ~0.5%),
        which flips near-tied neighbours: the training log's best held-out figures and
        evaluate.py on that best.pt agree only when both embed through the same model."""
        if not self.cfg.eval.fold_bn:
            return self.model
        # A private generator: drawing the probe must not shift the training RNG streams.
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(2, *self.dcfg["input_size"], generator=gen).to(self.device)
        fast = fold_batchnorm(self.model, probe)
        if fast is not self.model and self.cfg.train.channels_last:
            fast.to(memory_format=torch.channels_last)
        return fast

    def evaluate(self, figures: bool = False) -> dict[str, float]:
        """Held-out retrieval metrics; with `figures`, also ROC AUC and EER of the
        verification pairs, and (on the main process) their PR curve, the ROC and a small
        query grid in TensorBoard at the current global step.

        With `model.bn_stats: auto` the held-out images are embedded twice, with the running
        BatchNorm statistics training has adapted and with the pretrained ones, and the model
        keeps the better on `train.best_metric` (`pretrained_bn_stats` says which: 1 or 0).
        Batches of a few training classes can pull the statistics away from what describes
        unseen classes, while a new domain needs them adapted; only held-out data can tell."""
        key = self.cfg.train.best_metric
        candidates = [(None, 0.0)]
        if self.pretrained_bn is not None and self.state.step > 0:
            candidates.append((self.pretrained_bn, 1.0))
        chosen, adapted = None, self.model.bn_stats() if len(candidates) > 1 else None
        for stats, flag in candidates:
            if stats is not None:
                self.model.load_bn_stats(stats)
            out = self._heldout_metrics(with_verification=key in ("eer", "roc_auc"))
            if len(candidates) > 1:
                out[0]["pretrained_bn_stats"] = flag
            if chosen is None or _better(key, out[0], chosen[1][0]):
                chosen = (stats, out)
        if chosen[0] is None and adapted is not None:
            self.model.load_bn_stats(adapted)
        metrics, (emb, labels, indices, neighbours) = chosen[1]
        if figures:
            metrics.update(self._heldout_verification(emb, labels, indices, neighbours, True))
        return metrics

    def _heldout_metrics(self, with_verification: bool):
        """Retrieval (and optionally verification) metrics of the model as it is now, with
        what drawing figures needs: (metrics, (embeddings, labels, indices, neighbours))."""
        emb, labels, indices = extract_embeddings(
            self.inference_model(),
            self.eval_batches,
            self.infer_spec,
            from_prefix=self.from_prefix,
            desc="held-out embeddings",
        )
        e = self.cfg.eval
        ks = usable_ks(e.ks, len(labels) - 1)  # a small held-out set: fewer ks
        metrics, neighbours = retrieval_metrics(emb, labels, metric=e.metric, ks=ks)
        out = {k: float(v) for k, v in metrics.items()}
        if with_verification:
            out.update(self._heldout_verification(emb, labels, indices, neighbours, False))
        return out, (emb, labels, indices, neighbours)

    def _heldout_verification(self, emb, labels, indices, neighbours, draw) -> dict[str, float]:
        e, step = self.cfg.eval, self.state.step
        try:
            ver = verification_metrics(emb, labels, e.metric, e.verification_pairs, self.cfg.seed)
        except DataError as err:  # e.g. no class with two held-out images
            print(f"no held-out verification figures: {err}", file=sys.stderr)
            return {}
        if self.writer and draw:
            pairs = tensorboard.verification_pairs(
                emb, labels, e.metric, ver["num_pairs"], self.cfg.seed
            )
            tensorboard.add_pr_curve(self.writer, f"{HELDOUT}/verification_pr", *pairs, step)
            roc = figures.render(figures.plot_roc(ver["fpr"], ver["tpr"], ver), 80)
            self.writer.add_image(f"{HELDOUT}/roc", roc, step, dataformats="HWC")
            held = self.data.paths(self.data.split.selection)
            paths = [held[i] for i in indices]
            grid = figures.query_grid(
                neighbours, paths, paths, self.data.folder.classes, top=4, thumb=64,
                seed=self.cfg.seed, n=4, metric=e.metric,
            )
            image = figures.render(grid, figures.FIGURE_DPI)
            self.writer.add_image(f"{HELDOUT}/queries", image, step, dataformats="HWC")
        return {k: ver[k] for k in ("roc_auc", "eer", "tar_at_far_1e-2", "tar_at_far_1e-3")}

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format_version": CHECKPOINT_FORMAT,
            "mltrain_version": __version__,
            "model": self.model.state_dict(),
            "loss": self.criterion.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": asdict(self.state),
            "best": self.best,
            "start": self.start,
            "config": to_dict(self.cfg),
            "classes": list(self.data.folder.classes),
            "train_classes": self.data.train_classes,
            "data_config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.dcfg.items()
            },
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.criterion.loss.load_state_dict(ckpt["loss"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = StepState(**ckpt["state"])
        self.best = dict(ckpt["best"])
        self.start = dict(ckpt.get("start") or {})
        if self.writer:  # events past the checkpoint's step came from the lost run: purge
            self.writer.close()
            self.writer = SummaryWriter(str(self.run_dir), purge_step=self.state.step + 1)


    def log_start(self) -> None:
        """The config as text and the hparams summary, at the step training starts from, so the
        run shows in the Text and HParams tabs while it trains."""
        config = to_dict(self.cfg)
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", f"```yaml\n{text}```", self.state.step)
        tensorboard.add_hparams(self.writer, config, self.state.step)


    def log_epoch(self, epoch: int, stats: dict[str, float], metrics: dict[str, float]) -> None:
        """Throughput and the held-out curves at the global step of the epoch's end, the x-axis
        `train/loss` and `train/lr` are logged on per optimizer step; one line on stderr.

        The epoch's mean loss, data wait share and best-so-far figures stay in the history and
        metrics.json: as charts they repeat `train/loss` and the held-out curves."""
        step = self.state.step
        self.writer.add_scalar("train/images_per_s", stats["images_per_s"], step)
        for tag, v in tensorboard.heldout_scalars(metrics).items():
            self.writer.add_scalar(tag, v, step)
        shown = ", ".join(
            f"{k} {metrics[k]:.4f}" for k in ("precision_at_1", "map_at_r") if k in metrics
        )
        wait = stats.get("data_wait_share")
        print(
            f"epoch {epoch}: loss {stats['loss']:.4f}, {stats['images_per_s']:.1f} img/s"
            + (f" ({wait:.0%} waiting for data)" if wait is not None and wait >= 0.2 else "")
            + (f", held-out {shown}" if shown else "")
            + (" (pretrained BatchNorm statistics)" if metrics.get("pretrained_bn_stats") else ""),
            file=sys.stderr,
            flush=True,
        )


    def train_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed * 1000 + epoch)  # makes resuming at an epoch boundary exact
        self.model.set_trunk_frozen(epoch < cfg.train.freeze_backbone_epochs)
        log = self.writer.add_scalar if self.writer else None
        loader = self.epoch_loader(epoch)
        stats = train_one_epoch(
            self.net, self.loss, loader, self.optimizer, self.scheduler, self.state,
            self.settings(), log,
        )  # fmt: skip
        if self.state.batches_done:  # stopped mid-epoch by a signal: `fit` saves the position
            return
        stats = {k: distributed.mean(v) for k, v in stats.items()}
        self.scheduler.step(epoch + 1)
        self.state.epoch = epoch + 1
        if self.main:
            self.evaluate_and_save(stats)
        distributed.barrier()


    def evaluate_start(self) -> None:
        """Held-out metrics of the untrained model, logged at step 0: where the curve starts,
        and what training has to beat (`start_note`)."""
        self.start = self.evaluate()
        for tag, v in tensorboard.heldout_scalars(self.start).items():
            self.writer.add_scalar(tag, v, 0)
        shown = ", ".join(f"{k} {self.start[k]:.4f}" for k in ("precision_at_1", "map_at_r"))
        print(f"untrained: held-out {shown}", file=sys.stderr)
        if self.cfg.train.best_metric in self.start:  # the weights every epoch has to beat
            self.best = {"epoch": 0, "step": self.state.step, **self.start}
            self.save("best.pt")

    def evaluate_and_save(self, stats: dict[str, float]) -> None:
        """Held-out metrics every `eval_every` epochs and at the end; best.pt and last.pt."""
        cfg, epoch, done = self.cfg, self.state.epoch, self.done()
        metrics = {}
        if done or epoch % cfg.train.eval_every == 0:
            every = cfg.train.figures_every
            metrics = self.evaluate(figures=every > 0 and (done or epoch % every == 0))
        self.state.history.append({"epoch": epoch, "step": self.state.step, **stats, **metrics})
        key = cfg.train.best_metric
        improved = key in metrics and (
            _better(key, metrics, self.best) if kept_start(self.best)  # the start: beat it
            else not _better(key, self.best, metrics)  # between epochs, ties go to the later
        )  # fmt: skip
        if improved:
            self.best = {"epoch": epoch, "step": self.state.step, **metrics}
        self.log_epoch(epoch, stats, metrics)
        if improved:
            self.save("best.pt")
        self.save("last.pt")


    def save(self, name: str) -> Path:
        """`atomic_save` into checkpoints/: a failed write (full disk, lost permissions) leaves the
        file there as it was, and the error says so and how to go on."""
        path = self.run_dir / "checkpoints" / name
        try:
            atomic_save(self.checkpoint(), path)
        except OSError as e:
            last = self.run_dir / "checkpoints" / "last.pt"
            if last.is_file():
                then = f"{last} is intact; free space and continue with --resume {self.run_dir}"
            else:
                then = "no checkpoint was saved before this one; free space and start again"
            reason = e.strerror or e
            raise MltrainError(f"cannot write checkpoint {path} ({reason}); {then}") from None
        return path


    def save_interrupted(self) -> NoReturn:
        """After SIGINT/SIGTERM: `last.pt` with the position inside the epoch and the RNG states
        (no held-out evaluation, no best.pt), then exit 130 as an interrupted program does."""
        state = self.state
        if state.batches_done:
            state.rng = rng_state()
            path = self.save("last.pt")
        else:  # stopped at an epoch boundary: that epoch's last.pt is already written
            path = self.run_dir / "checkpoints" / "last.pt"
        print(
            f"interrupted {_position(state)}; saved {path}; "
            f"continue exactly with --resume {self.run_dir}",
            file=sys.stderr,
        )
        raise SystemExit(130)


    def done(self) -> bool:
        return trained_all(self.state.epoch, self.state.step, self.cfg)


    def hit_max_steps(self) -> bool:
        return past_max_steps(self.state.step, self.cfg)


def _better(key: str, new: dict[str, Any], old: dict[str, Any]) -> bool:
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


def start_note(key: str, best: dict[str, Any], start: dict[str, Any],
               split: str = "class_disjoint") -> str | None:
    """A note when the best held-out `key` is no better than the untrained model's, so the user
    knows before shipping the result. On unseen classes (class_disjoint) fine-tuning on a few
    others can specialise the backbone away from them; on the training classes' own held-out
    images (per_class, none) it means training did not help. A start already at the metric's
    best possible value leaves nothing to beat: said as such."""
    if key not in start or key not in best or _better(key, best, start):
        return None
    if start[key] == (0.0 if key in LOWER_IS_BETTER else 1.0):
        return (f"held-out {key} was already {start[key]:.4f} before training: these held-out "
                "images are too few or too easy to show what training changed; hold out more "
                "images (data.train_fraction) to judge it")  # fmt: skip
    unseen = split == "class_disjoint"
    why = ("training specialised the backbone to the training classes at the held-out ones' "
           "expense; compare with evaluate.py --backbone, " if unseen else
           "training did not help on held-out images of its own classes; ")  # fmt: skip
    kept = (" (best.pt holds the untrained starting weights, epoch 0, so it is never worse "
            "than the start)" if kept_start(best) else "")  # fmt: skip
    return (f"held-out {key} {best[key]:.4f} (best epoch) never beat the untrained model's "
            f"{start[key]:.4f}{kept}: {why}lower the learning rate (e.g. "
            "train.optimizer.args.lr=1e-4), train fewer stages (model.trainable_stages) or add "
            f"training {'classes' if unseen else 'images'}")  # fmt: skip


def _position(state: StepState) -> str:
    if state.batches_done:
        return f"in epoch {state.epoch + 1} after batch {state.batches_done}, step {state.step}"
    return f"at epoch {state.epoch}, step {state.step}"


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set `stop`: training ends after the current optimizer step and saves
    its position. A second signal interrupts at once; an unfinished checkpoint write is then
    dropped and the previous file stays. DataLoader workers forked from this process inherit
    the handler and ignore it."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            return
        if stop.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
        stop.set()
        with contextlib.suppress(OSError):  # not print(): it may re-enter an interrupted write
            os.write(2, b"\nstopping after this step to save a checkpoint (again: stop now)\n")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def fit(
    cfg: Config | None = None, resume: str | Path | None = None, overrides: list[str] | None = None
) -> Path:
    """Train and return the run folder. `resume` is a run folder or checkpoint to continue.

    SIGINT/SIGTERM during training save the position inside the epoch to `last.pt` and exit
    130 (single process; see `_stop_on_signals`); `resume` then continues exactly."""
    ckpt = None
    if resume is not None:
        check_resume_overrides(overrides or [])
        ckpt = load_checkpoint(resume)
        cfg = checkpoint_config(ckpt, overrides, f"checkpoint {resume}")
        run_dir = run_folder(resume)
        if finished(ckpt, cfg, run_dir):  # before data checks and prefix cache
            where = _position(StepState(**ckpt["state"]))
            print(f"note: {run_dir} already finished ({where}); nothing to train "
                  "(to train longer, start a new run). Its summary:", file=sys.stderr)  # fmt: skip
            return run_dir
    check_optimization(cfg)
    if resume is not None:
        distributed.init(resolve_device(cfg.train.device))
        check_writable(run_dir, "fix its permissions or free space, or resume a copy of it")
    else:
        cfg.data.root = absolute_root(cfg.data.root)  # checkpoints work from any folder
        distributed.init(resolve_device(cfg.train.device))
        run_dir = distributed.broadcast_path(new_run_dir(cfg) if distributed.is_main() else None)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # during setup: stop at once
    try:
        if ckpt is None and distributed.is_main():
            save_config(cfg, run_dir / "config.yaml")
        return _train(cfg, run_dir, ckpt)
    except BaseException:
        if ckpt is None and distributed.is_main():
            _remove_if_stub(run_dir)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


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


def check_best_metric_fits(cfg: Config, heldout: int) -> None:
    """Before training: a precision/recall@k that a held-out set this small cannot compute
    would never pick a best.pt."""
    k, most = best_metric_k(cfg.train.best_metric), max(heldout - 1, 1)  # see `usable_ks`
    if k is not None and k > most:
        raise ConfigError(
            f"train.best_metric: {cfg.train.best_metric} needs {k + 1} or more held-out images; "
            f"this split holds {heldout}: choose a k of at most {most}, or map_at_r"
        )


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


def _remove_if_stub(run_dir: Path) -> None:
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


def _train(cfg: Config, run_dir: Path, ckpt: dict[str, Any] | None) -> Path:
    """Build the run (from `ckpt` when resuming), train the remaining epochs, write metrics."""
    setup_start = time.perf_counter()
    run = Run(cfg, run_dir, resuming=ckpt is not None)
    setup_seconds = time.perf_counter() - setup_start
    if ckpt is not None:
        run.restore(ckpt)
        print(f"resuming {run_dir} {_position(run.state)}", file=sys.stderr)
    if distributed.world()[1] == 1:  # under DDP ranks would have to agree on a stop step
        _stop_on_signals(run.stop)
    if run.writer:
        run.log_start()
    if cfg.train.eval_start and ckpt is None and run.state.step == 0:
        if run.main:
            run.evaluate_start()
        distributed.barrier()  # the other ranks wait, as after each epoch's evaluation
    start = time.perf_counter()
    try:
        for epoch in range(run.state.epoch, cfg.train.epochs):
            if run.hit_max_steps():
                break
            run.train_epoch(epoch)
            if run.stop.is_set() and not run.done():
                run.save_interrupted()
    except KeyboardInterrupt:
        if (run_dir / "checkpoints" / "last.pt").is_file():
            print(
                f"interrupted; {run_dir}/checkpoints/last.pt holds the last saved position; "
                f"continue with --resume {run_dir}",
                file=sys.stderr,
            )
        else:
            print("interrupted before the first checkpoint; nothing to resume", file=sys.stderr)
        raise SystemExit(130) from None
    else:
        if run.writer:  # the HParams tab marks the run finished
            tensorboard.add_hparams(run.writer, to_dict(cfg), run.state.step, True)
    finally:
        if run.writer:
            run.writer.close()
    if not run.main:
        distributed.shutdown()
        return run_dir
    final = run.state.history[-1] if run.state.history else {}
    summary = {
        "final": final,
        "best": run.best,
        "best_metric": cfg.train.best_metric,
        "start": run.start,  # held-out metrics before training (train.eval_start)
        "best_is_start": kept_start(run.best),  # best.pt holds the untrained weights
        # the images best, start and the held-out curve are measured on (data.val_fraction)
        "selected_on": "validation" if len(run.data.split.val) else "heldout",
        "epochs": run.state.epoch,
        "steps": run.state.step,
        "bad_steps": run.state.bad_steps_total,
        "setup_seconds": setup_seconds,  # data checks, model, prefix cache
        "train_seconds": time.perf_counter() - start,
    }
    note = start_note(cfg.train.best_metric, run.best, run.start, cfg.data.split)
    if note:
        report_notes([note], run_dir)
    notes = run_dir / "notes.txt"  # every adaptation of this run (and of its resumed parts)
    if notes.is_file():
        summary["notes"] = list(dict.fromkeys(notes.read_text(encoding="utf-8").splitlines()))
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    distributed.shutdown()
    return run_dir
