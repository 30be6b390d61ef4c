"""Training-step throughput: mltrain's step loop versus a plain PyTorch loop, per mode.

    python benchmarks/train.py [--steps 20] [--batch 32] [--modes classification,pooling,...]

For each shipped config (classification, pooling, siamese, triplet):

- framework: `train_one_epoch` on the loader `mltrain.train.run.Run` builds (DataLoader workers,
  the config's sampler, loss and miner, channels_last, bf16 autocast where the CPU has it,
  tensorboard logging), with `model.trainable_stages=null` and `train.cache_frozen=false` so that
  the whole network trains as in the plain loop. Step times come from the loop's own log hook
  and leave out `--warmup` steps (worker start-up, first batches).
- pure compute: the same model, optimizer and settings on the same batches pre-loaded in
  memory, with no loader, progress bar or logging; overhead = (framework - pure) / framework.
- plain: fp32, NCHW, the same batches pre-loaded, `loss.backward(); opt.step()` with
  `torch.optim.AdamW`, on a copy of the same model and loss.
- cached (what the shipped configs run): their `trainable_stages` with `cache_frozen: true`, i.e.
  training the last stages on cached prefix features, through `Run` on a per-class subset
  of the images (the prefix cache is built once, untimed, in a private cache folder).

Plain and pure steps alternate one by one, half of them before and half after the framework
and cached blocks, so that drifting machine load hits every variant alike.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/train.py`
    import common  # type: ignore[no-redef]

import torch  # noqa: E402

from mltrain.config import Config, load_config  # noqa: E402
from mltrain.inference.batching import to_device  # noqa: E402
from mltrain.model.losses import build_criterion  # noqa: E402
from mltrain.model.network import build_model  # noqa: E402
from mltrain.runtime import autocast  # noqa: E402
from mltrain.train.loop import LoopSettings, train_one_epoch  # noqa: E402
from mltrain.train.run import Run  # noqa: E402

TARGET_RATIO = 1.8
TARGET_OVERHEAD = 10.0  # percent


def preload(run: Run, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` batches of epoch 0, exactly as the framework loop will see them."""
    loader = run.epoch_loader(0)
    batches = []
    for x, y, _ in loader:
        batches.append((x, torch.as_tensor(y)))
        if len(batches) == n:
            break
    del loader
    return batches


def _net_and_loss(run: Run):
    """What `fit` hands `train_one_epoch`: the (possibly DDP-wrapped) net and the run's loss."""
    return getattr(run, "net", run.model), getattr(run, "loss", run.criterion)


def pure_steps(run: Run, batches, settings: LoopSettings) -> float:
    """The framework's step (same model, optimizer, autocast, layout) minus loader and hooks."""
    (model, criterion), opt = _net_and_loss(run), run.optimizer
    model.train()
    head = run.model.logits if run.model.head is not None else None
    start = time.perf_counter()
    for x, y in batches:
        x, y = to_device(x, settings.device, settings.channels_last), y.to(settings.device)
        with autocast(settings.device, settings.amp_dtype):
            emb = model(x, from_prefix=settings.from_prefix)
        loss = criterion(emb.float(), y, head)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


class Plain:
    """The notebook loop: fp32, NCHW, AdamW, on a copy of the run's model and loss."""

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        n_classes = len(run.data.train_classes)
        self.model = build_model(cfg.model, num_classes=n_classes)
        self.model.load_state_dict(run.model.state_dict())  # identical start, even if random
        self.model.to(memory_format=torch.contiguous_format)
        self.criterion = build_criterion(cfg.train.loss, cfg.train.miner, n_classes,
                                         self.model.embedding_dim, cfg.model.head,
                                         hybrid=cfg.model.bnneck)
        args = dict(cfg.train.optimizer.get("args") or {})
        params = [*self.model.parameters(), *self.criterion.loss.parameters()]
        self.opt = torch.optim.AdamW(
            [p for p in params if p.requires_grad], lr=args.get("lr", 1e-3),
            weight_decay=args.get("weight_decay", 1e-2),
        )

    def steps(self, batches) -> float:
        self.model.train()
        start = time.perf_counter()
        for x, y in batches:
            logits = self.model.logits if self.model.head is not None else None
            loss = self.criterion(self.model(x), y, logits)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return time.perf_counter() - start


def alternate(plain: Plain, run: Run, plain_b, pure_b, settings) -> tuple[float, float]:
    """Plain and pure-compute steps interleaved one by one (evenly spread), each timed alone,
    so that both see the same machine load; returns (plain seconds, pure seconds)."""
    order = sorted([((i + 0.5) / len(plain_b), "plain", b) for i, b in enumerate(plain_b)]
                   + [((i + 0.5) / len(pure_b), "pure", b) for i, b in enumerate(pure_b)],
                   key=lambda t: (t[0], t[1]))
    spent = {"plain": 0.0, "pure": 0.0}
    for _, kind, b in order:
        spent[kind] += plain.steps([b]) if kind == "plain" else pure_steps(run, [b], settings)
    return spent["plain"], spent["pure"]


def framework_steps(run: Run, warmup: int, steps: int) -> dict[str, float]:
    """`train_one_epoch` over the Run's epoch-0 loader for warmup + steps optimizer steps.

    Step ends are stamped by the loop's own log hook (which also writes tensorboard scalars,
    as `fit` does); the steady-state time leaves out the first `warmup` steps."""
    stamps: list[float] = []
    writer = getattr(run, "writer", None)

    def log(key: str, value: float, step: int) -> None:
        if writer is not None:
            writer.add_scalar(key, value, step)
        if key == "train/loss":
            stamps.append(time.perf_counter())

    settings = run.settings()
    settings.max_steps = run.state.step + warmup + steps
    net, loss = _net_and_loss(run)
    start = time.perf_counter()
    # the progress bar runs (and costs) as in `fit`, but its output goes nowhere
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        stats = train_one_epoch(net, loss, run.epoch_loader(0), run.optimizer, run.scheduler,
                                run.state, settings, log=log)
    timed = len(stamps) - warmup
    if timed < 1:
        raise SystemExit(f"only {len(stamps)} steps ran; lower --steps/--warmup or add images")
    batch = run.cfg.train.batch_size
    step_s = (stamps[-1] - stamps[warmup - 1]) / timed
    return {
        "steps": timed,
        "step_s": step_s,
        "img_s": batch / step_s,
        "first_step_s": stamps[0] - start,  # worker start-up + first batch + first step
        "loop_img_s": stats["images_per_s"],  # train_one_epoch's own figure, start-up included
        "data_wait_share": stats["data_wait_share"],
    }


def make_subset(folder, root: Path, per_class: int, dest: Path) -> Path:
    """A folder of symlinks to `per_class` images of every class, spread over each class."""
    for c, name in enumerate(folder.classes):
        idx = [i for i in range(len(folder)) if folder.labels[i] == c]
        n = min(per_class, len(idx))
        take = [idx[round(j * (len(idx) - 1) / max(n - 1, 1))] for j in range(n)]
        (dest / name).mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(take):
            src = folder.paths[i]
            (dest / name / f"{j:04d}_{src.name}").symlink_to(src.resolve())
    return dest


def mode_config(mode: str, root: Path, args, out: Path, extra: list[str]) -> Config:
    return common.config_for(mode, root, [
        *common.model_overrides(args), f"train.batch_size={args.batch}",
        "data.check_images=false", f"output_dir={out}", *extra,
    ])


def bench_mode(mode: str, args, root: Path, subset: Path | None, tmp: Path) -> dict:
    full_cfg = mode_config(mode, root, args, tmp / "runs",
                           ["model.trainable_stages=null", "train.cache_frozen=false"])
    run = Run(full_cfg, tmp / "runs" / f"{mode}-full")
    settings = run.settings()
    batches = preload(run, args.warmup + args.steps)
    warm, timed = batches[: max(args.warmup, 1)], batches[args.warmup :]
    plain = Plain(run)
    plain_b = timed[: args.plain_steps]
    pure_b = timed[: args.pure_steps]
    cached = None
    cache_build_s = 0.0
    if subset is not None:
        start = time.perf_counter()
        cached = Run(mode_config(mode, subset, args, tmp / "runs", []),
                     tmp / "runs" / f"{mode}-cached")
        cache_build_s = time.perf_counter() - start
    # untimed warm-up of each compute path (AdamW state, oneDNN kernels)
    plain.steps(warm[:1])
    pure_steps(run, warm[:1], settings)

    half_p, half_q = len(plain_b) // 2, len(pure_b) // 2
    t_plain, t_pure = alternate(plain, run, plain_b[:half_p], pure_b[:half_q], settings)
    fw = framework_steps(run, args.warmup, args.steps)
    cw = framework_steps(cached, args.warmup, args.cached_steps) if cached else None
    t2_plain, t2_pure = alternate(plain, run, plain_b[half_p:], pure_b[half_q:], settings)
    t_plain, t_pure = t_plain + t2_plain, t_pure + t2_pure
    workers = run.epoch_loader(0).num_workers
    for r in (run, cached):
        if r is not None and getattr(r, "writer", None) is not None:
            r.writer.close()
    batch = args.batch
    plain_step, pure_step = t_plain / len(plain_b), t_pure / len(pure_b)
    return {
        "mode": mode,
        "plain_img_s": batch / plain_step,
        "pure_img_s": batch / pure_step,
        "fw": fw,
        "cached": cw,
        "cache_build_s": cache_build_s,
        "overhead_pct": 100 * (fw["step_s"] - pure_step) / fw["step_s"],
        "ratio": fw["img_s"] / (batch / plain_step),
        "cached_ratio": cw["img_s"] / (batch / plain_step) if cw else float("nan"),
        "amp": str(run.amp).replace("torch.", ""),
        "shipped_frozen": cached.model.frozen_stages if cached else None,  # trainable_stages
        "workers": workers,
        "plain_steps": len(plain_b),
        "pure_steps": len(pure_b),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed framework steps per mode")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed framework steps first (worker start-up, first batches); >= 1")
    parser.add_argument("--plain-steps", type=int, default=None,
                        help="timed steps of the plain fp32 loop (default: steps/4, >= 2)")
    parser.add_argument("--pure-steps", type=int, default=None,
                        help="timed pure-compute steps (default: 2/5 of steps, >= 2)")
    parser.add_argument("--cached-steps", type=int, default=None,
                        help="timed steps on cached prefix features (default: steps/2, >= 2)")
    parser.add_argument("--no-cached", action="store_true",
                        help="skip the shipped frozen_stages + cache_frozen measurement")
    parser.add_argument("--cached-per-class", type=int, default=None,
                        help="images per class in the cached run's subset (default: enough "
                             "for the steps)")
    parser.add_argument("--modes", default=",".join(common.MODES))
    common.add_threads_arg(parser)
    common.add_model_args(parser)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := sorted(set(modes) - set(common.MODES)):
        parser.error(f"unknown modes {unknown}; choose from {', '.join(common.MODES)}")
    threads = common.apply_threads(args.threads)
    args.warmup = max(args.warmup, 1)  # the first step's end is the timing's reference
    args.plain_steps = min(args.steps, args.plain_steps or max(2, args.steps // 4))
    args.pure_steps = min(args.steps, args.pure_steps or max(2, 2 * args.steps // 5))
    args.cached_steps = args.cached_steps or max(2, args.steps // 2)

    probe = load_config(common.CONFIGS / f"{modes[0]}.yaml", common.model_overrides(args))
    root = common.data_root(args.root, probe)
    folder = common.scan(common.config_for(modes[0], root))
    print(f"# train benchmark: batch {args.batch}, {args.steps} framework steps per mode "
          f"(after {args.warmup} warm-up), plain {args.plain_steps} / pure {args.pure_steps} "
          f"steps; data {root} ({len(folder)} images, {len(folder.classes)} classes)")
    print(f"backbone {probe.model.backbone} (pretrained={probe.model.pretrained}), "
          f"torch threads {threads}; {common.load_note()}")
    wall = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="mltrain-bench-") as tmp_name:
        tmp = Path(tmp_name)
        saved_cache = os.environ.get("MLTRAIN_CACHE")
        os.environ["MLTRAIN_CACHE"] = str(tmp / "cache")  # a cold, private prefix cache
        try:
            subset = None
            if not args.no_cached:
                per_class = args.cached_per_class or _per_class_for(
                    (args.warmup + args.cached_steps) * args.batch, len(folder.classes),
                    probe.data.train_fraction)
                subset = make_subset(folder, root, per_class, tmp / "subset")
                print(f"cached runs: {per_class} images per class "
                      f"(symlinked subset), {args.cached_steps} timed steps")
            for mode in modes:
                t0 = time.perf_counter()
                results.append(bench_mode(mode, args, root, subset, tmp))
                r = results[-1]
                print(f"  {mode} done in {time.perf_counter() - t0:.0f} s: framework "
                      f"{r['fw']['img_s']:.1f} img/s, plain {r['plain_img_s']:.1f} img/s",
                      flush=True)
                gc.collect()
        finally:
            if saved_cache is None:
                os.environ.pop("MLTRAIN_CACHE", None)
            else:
                os.environ["MLTRAIN_CACHE"] = saved_cache
    wall = time.perf_counter() - wall
    report(results, args, wall)
    return results


def _per_class_for(images: int, classes: int, fraction: float) -> int:
    return math.ceil(images / classes / fraction) + 2


def report(results: list[dict], args, wall: float) -> None:
    rows = []
    for r in results:
        fw, cw = r["fw"], r["cached"]
        rows.append([
            r["mode"], r["plain_img_s"], r["pure_img_s"], fw["img_s"], r["ratio"],
            r["overhead_pct"], 100 * fw["data_wait_share"],
            r["shipped_frozen"] if cw else "-", cw["img_s"] if cw else float("nan"),
            r["cached_ratio"],
        ])
    print()
    print(common.markdown_table([
        "mode", "plain fp32 NCHW img/s", "pure compute img/s", "framework img/s",
        "framework / plain", "framework overhead %", "data wait %",
        "shipped frozen_stages", "cached img/s", "cached / plain",
    ], rows))
    amp = results[0]["amp"] if results else "?"
    print(f"framework and pure compute: channels_last, autocast {amp}, loader workers "
          f"{results[0]['workers'] if results else '?'}; overhead = (framework step - pure "
          "compute step) / framework step; data wait % = train_one_epoch's data_wait_share "
          "(its whole call, start-up included)")
    print("start-up per epoch (worker start, first batches, first step) and train_one_epoch's "
          "own img/s including it:")
    for r in results:
        fw, cw = r["fw"], r["cached"]
        line = (f"  {r['mode']}: first step after {fw['first_step_s']:.1f} s; loop figure "
                f"{fw['loop_img_s']:.1f} img/s over {args.warmup + fw['steps']} steps")
        if cw:
            line += (f"; cached: first step after {cw['first_step_s']:.2f} s, "
                     f"{cw['steps']} timed steps")
        if r["cache_build_s"] > 1:
            line += f"; building the cached Run took {r['cache_build_s']:.0f} s (one-off)"
        print(line)
    print()
    for r in results:
        print(common.target_line(f"{r['mode']}: framework / plain fp32", r["ratio"],
                                 TARGET_RATIO, unit="x"))
        print(common.target_line(f"{r['mode']}: framework overhead", r["overhead_pct"],
                                 TARGET_OVERHEAD, higher_is_better=False, unit="%"))
    child = common.rss_mb(resource.RUSAGE_CHILDREN)
    print(f"peak RSS {common.rss_mb():.0f} MiB (main), {child:.0f} MiB (largest worker); "
          f"total {wall:.0f} s; {common.load_note()}")


if __name__ == "__main__":
    main()
