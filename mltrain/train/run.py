"""`fit`: the whole training run, from a config to a run folder with checkpoints and metrics.

Read top to bottom: `Run.__init__` builds data, model, loss, loaders and optimizer; `_train`
trains epoch by epoch, each judged on held-out images and checkpointed, then writes the
summary. The jobs around it live beside it: `setup` (checks before the first step),
`loaders` (images or the cached frozen prefix), `heldout` (evaluation and its figures),
`checkpoints` (best.pt, last.pt, resume), `signals` and `report`."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from mltrain import __version__, distributed
from mltrain.config import Config, save_config, to_dict
from mltrain.data.pipeline import RunData, prepare_data
from mltrain.data.readers import absolute_root
from mltrain.evaluation import tensorboard
from mltrain.files import check_writable
from mltrain.model.checkpoint import CHECKPOINT_FORMAT
from mltrain.model.losses import Criterion, build_criterion
from mltrain.model.network import EmbeddingModel, build_model, data_config
from mltrain.runtime import Runtime, resolve_device
from mltrain.train import report
from mltrain.train.checkpoints import (
    check_best_metric_fits,
    improves,
    open_resume,
    past_max_steps,
    position,
    save_checkpoint,
    trained_all,
)
from mltrain.train.geometry import choose_crop_mode
from mltrain.train.heldout import HeldOut, pretrained_bn_stats
from mltrain.train.loaders import Loaders
from mltrain.train.loop import LoopSettings, StepState, rng_state, train_one_epoch
from mltrain.train.optim import check_optimization, make_optimizer, make_scheduler
from mltrain.train.setup import (
    check_disk_space,
    check_sampler,
    distributed_net,
    fit_batch_to_data,
    new_run_dir,
    place_model,
    remove_if_stub,
    report_split_notes,
    seed_everything,
)
from mltrain.train.signals import exit_interrupted, setup_handlers, stop_on_signals
from mltrain.train.whiten import whiten_best


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
        writes = run_dir if self.main else None  # notes and config: the main process alone

        # data: images, the recorded split, a batch size it can fill
        self.data: RunData = prepare_data(cfg, writes, resuming=resuming)
        self.side = self.data.split.selection_side
        report_split_notes(cfg, self.data, writes)
        check_best_metric_fits(cfg, len(self.data.split.selection))
        fit_batch_to_data(cfg, self.data, writes)
        check_sampler(cfg, self.data, resuming)

        # model and loss
        n_classes = len(self.data.train_classes)
        self.model: EmbeddingModel = build_model(cfg.model, num_classes=n_classes)
        self.pretrained_bn = pretrained_bn_stats(cfg.model, self.model)
        self.dcfg = data_config(self.model, cfg.model)
        self.criterion: Criterion = build_criterion(
            cfg.train.loss, cfg.train.miner, n_classes, self.model.embedding_dim, cfg.model.head,
            hybrid=cfg.model.bnneck,
        )
        check_disk_space(cfg, self.data, self.model, self.criterion.loss, self.dcfg, run_dir)
        place_model(cfg, self.model, self.criterion.loss, self.device)
        if cfg.model.crop_mode == "auto":  # the eval geometry the validation images prefer
            mode = None  # rank 0 decides: a near tie must not split the ranks
            if self.main:
                mode = choose_crop_mode(cfg, self.data, self.model, self.infer_spec, writes)
            cfg.model.crop_mode = distributed.broadcast_object(mode)
            self.dcfg = data_config(self.model, cfg.model)
            if writes is not None:
                save_config(cfg, writes / "config.yaml")

        # what the steps and the evaluation read
        with distributed.main_first():  # rank 0 fills the prefix cache, the others read it
            self.loaders = Loaders(cfg, self.data, self.model, self.dcfg, self.infer_spec)
        self.from_prefix, self.eval_batches = self.loaders.from_prefix, self.loaders.eval_batches
        self.net = distributed_net(cfg, self.model)

        # optimizer and schedule; a resumed run keeps settings accepted when it started
        self.optimizer = make_optimizer(cfg, self.model, self.criterion.loss, strict=not resuming)
        per_epoch = max(len(self.epoch_loader(0)) // cfg.train.grad_accum, 1)
        self.scheduler = make_scheduler(cfg, self.optimizer, per_epoch)

        self.heldout = HeldOut(cfg, self.data, self.model, self.eval_batches, self.from_prefix,
                               self.infer_spec, tuple(self.dcfg["input_size"]),
                               self.pretrained_bn)  # fmt: skip
        self.state = StepState()
        self.best: dict[str, Any] = {}
        self.start: dict[str, float] = {}  # held-out metrics before training (train.eval_start)
        self.stop = threading.Event()  # set on SIGINT/SIGTERM: save at the next step boundary
        self.writer = SummaryWriter(str(run_dir)) if self.main else None

    # --- one epoch ----------------------------------------------------------------------------

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

    def evaluate_and_save(self, stats: dict[str, float]) -> None:
        """Held-out metrics every `eval_every` epochs and at the end; best.pt and last.pt."""
        cfg, epoch, done = self.cfg, self.state.epoch, self.done()
        metrics = {}
        if done or epoch % cfg.train.eval_every == 0:
            every = cfg.train.figures_every
            metrics = self.evaluate(figures=every > 0 and (done or epoch % every == 0))
        self.state.history.append({"epoch": epoch, "step": self.state.step, **stats, **metrics})
        improved = improves(cfg.train.best_metric, metrics, self.best)
        if improved:
            self.best = {"epoch": epoch, "step": self.state.step, **metrics}
        report.log_epoch(self.writer, epoch, self.state.step, stats, metrics, self.side)
        if improved:
            self.save("best.pt")
        self.save("last.pt")

    def evaluate_start(self) -> None:
        """Held-out metrics of the untrained model, logged at step 0: where the curve starts,
        and what training has to beat (`start_note`)."""
        self.start = self.evaluate()
        report.log_untrained(self.writer, self.start, self.side)
        if self.cfg.train.best_metric in self.start:  # the weights every epoch has to beat
            self.best = {"epoch": 0, "step": self.state.step, **self.start}
            self.save("best.pt")

    def evaluate(self, figures: bool = False) -> dict[str, float]:
        """Held-out metrics now; with `figures`, also verification figures and TensorBoard
        images (see `HeldOut.evaluate`)."""
        return self.heldout.evaluate(self.state.step, self.writer, figures)

    # --- what the steps use -------------------------------------------------------------------

    def loss(self, emb: torch.Tensor, labels: torch.Tensor, head) -> torch.Tensor:
        """The loss of the global batch (gathered from every rank when distributed)."""
        return self.criterion(*distributed.gather(emb, labels), head)

    def epoch_loader(self, epoch: int) -> DataLoader:
        return self.loaders.epoch_loader(epoch)

    def inference_model(self) -> EmbeddingModel:
        """The model held-out embeddings come from (see `heldout.inference_model`)."""
        return self.heldout.model_for_inference()

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

    def done(self) -> bool:
        return trained_all(self.state.epoch, self.state.step, self.cfg)

    def hit_max_steps(self) -> bool:
        return past_max_steps(self.state.step, self.cfg)

    # --- checkpoints --------------------------------------------------------------------------

    def save(self, name: str) -> Path:
        return save_checkpoint(self.checkpoint(), self.run_dir, name)

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
            f"interrupted {position(state)}; saved {path}; "
            f"continue exactly with --resume {self.run_dir}",
            file=sys.stderr,
        )
        raise SystemExit(130)


def fit(
    cfg: Config | None = None, resume: str | Path | None = None, overrides: list[str] | None = None
) -> Path:
    """Train and return the run folder. `resume` is a run folder or checkpoint to continue.

    SIGINT/SIGTERM during training save the position inside the epoch to `last.pt` and exit
    130 (single process; see `mltrain.train.signals`); `resume` then continues exactly."""
    ckpt = None
    if resume is not None:
        ckpt, cfg, run_dir, done = open_resume(resume, overrides or [])
        if done:
            return run_dir
    check_optimization(cfg)
    if resume is not None:
        distributed.init(resolve_device(cfg.train.device))
        check_writable(run_dir, "fix its permissions or free space, or resume a copy of it")
    else:
        cfg.data.root = absolute_root(cfg.data.root)  # checkpoints work from any folder
        distributed.init(resolve_device(cfg.train.device))
        run_dir = distributed.broadcast_path(new_run_dir(cfg) if distributed.is_main() else None)
    with setup_handlers():
        try:
            if ckpt is None and distributed.is_main():
                save_config(cfg, run_dir / "config.yaml")
            return _train(cfg, run_dir, ckpt)
        except BaseException:
            if ckpt is None and distributed.is_main():
                remove_if_stub(run_dir)
            raise


def _train(cfg: Config, run_dir: Path, ckpt: dict[str, Any] | None) -> Path:
    """Build the run (from `ckpt` when resuming), train the remaining epochs, write metrics."""
    setup_start = time.perf_counter()
    run = Run(cfg, run_dir, resuming=ckpt is not None)
    setup_seconds = time.perf_counter() - setup_start
    if ckpt is not None:
        run.restore(ckpt)
        print(f"resuming {run_dir} {position(run.state)}", file=sys.stderr)
    if distributed.world()[1] == 1:  # under DDP ranks would have to agree on a stop step
        stop_on_signals(run.stop)
    if run.writer:
        report.log_start(run.writer, cfg, run.state.step)
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
        exit_interrupted(run_dir)
    else:
        if run.writer:  # the HParams tab marks the run finished
            tensorboard.add_hparams(run.writer, to_dict(cfg), run.state.step, True)
    finally:
        if run.writer:
            run.writer.close()
    if run.main and cfg.train.whiten == "auto" and run.done() and run.best:
        run.best = whiten_best(cfg, run.data, run.model, run.heldout, run.dcfg, run_dir) or run.best
    if run.main:
        seconds = (setup_seconds, time.perf_counter() - start)
        report.write_summary(run_dir, cfg, run.state, run.best, run.start,
                             bool(len(run.data.split.val)), seconds)  # fmt: skip
    distributed.shutdown()
    return run_dir
