"""Crashes, kills, non-finite losses and multi-process training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mltrain.config import load_config
from mltrain.errors import ConfigError, MltrainError
from mltrain.files import size_text
from mltrain.model.checkpoint import load_checkpoint
from mltrain.model.losses import Criterion
from mltrain.train import run as trainer
from mltrain.train.loop import NonFiniteLoss
from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[2]
BASE = [
    "model.pretrained=false",
    "model.image_size=32",
    "data.exclude_classes=[]",
    "data.num_workers=0",
    "eval.batch_size=32",
    "train.amp=off",
    "eval.amp=off",
]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLTRAIN_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": str(REPO)}


def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    sets = [*BASE, f"data.root={root}", f"output_dir={out}", *extra]
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/siamese.yaml")]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


# 6 classes x 8 training images in batches of 8: 6 optimizer steps per epoch
KILL_EXTRA = ["train.epochs=4", "train.batch_size=8", "model.trainable_stages=null",
              "train.cache_frozen=false"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, run folder of an uninterrupted run) that killed runs must match."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    root = write_image_folder(tmp / "data", classes=6, per_class=16, size=(48, 48))
    full = subprocess.run(_train_cmd(root, tmp / "full", *KILL_EXTRA), env=_env(tmp),
                          capture_output=True, text=True, check=True)
    return root, Path(full.stdout.strip().splitlines()[-1])


def _resume_and_compare(run_dir: Path, full_dir: Path, env: dict[str, str]) -> None:
    resumed = subprocess.run([*_train_cmd(Path("unused"), Path("unused"))[:2], "--resume",
                              str(run_dir)], env=env, capture_output=True, text=True, check=True)
    assert Path(resumed.stdout.strip().splitlines()[-1]) == run_dir
    a, b = _weights(full_dir), _weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"
    ma = json.loads((full_dir / "metrics.json").read_text())["final"]
    mb = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert ma["precision_at_1"] == mb["precision_at_1"] and ma["map_at_r"] == mb["map_at_r"]
    ha = load_checkpoint(full_dir / "checkpoints" / "last.pt")["state"]["history"]
    hb = load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]  # an interrupted epoch's too


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    root, full_dir = uninterrupted
    env = _env(tmp_path)
    proc = subprocess.Popen(_train_cmd(root, tmp_path / "killed", *KILL_EXTRA), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob("*/*/checkpoints/last.pt"))
        if found:
            last = found[0]
            time.sleep(0.3)  # into the second epoch
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert last is not None
    run_dir = last.parent.parent
    assert load_checkpoint(last)["state"]["epoch"] < 4  # it really stopped early
    _resume_and_compare(run_dir, full_dir, env)


# train.py with a marker file at optimizer step 8 (the 2nd of epoch 2) and every step from
# there slowed by 0.2 s (sleeping changes no numbers), so a SIGTERM sent on seeing the marker
# lands mid-epoch however loaded the machine is.
SLOW_FROM_STEP_8 = """
import os, runpy, sys, time
from pathlib import Path
from mltrain.train import loop as engine
real = engine._optimizer_step
def slowed(model, optimizer, scheduler, state, cfg):
    real(model, optimizer, scheduler, state, cfg)
    if state.step >= 8:
        Path(os.environ["MARKER"]).touch()
        time.sleep(0.2)
engine._optimizer_step = slowed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigterm_mid_epoch_saves_position_and_resume_equals_uninterrupted(tmp_path,
                                                                         uninterrupted):
    root, full_dir = uninterrupted
    marker = tmp_path / "step8"
    env = {**_env(tmp_path), "MARKER": str(marker)}
    cmd = [sys.executable, "-c", SLOW_FROM_STEP_8,
           *_train_cmd(root, tmp_path / "stopped", *KILL_EXTRA)[1:]]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not marker.exists():
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    run_dir = next((tmp_path / "stopped").glob("*/*"))
    assert f"--resume {run_dir}" in stderr
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]
    assert state["epoch"] == 1 and 0 < state["batches_done"] < 6, state["batches_done"]
    assert len(state["history"]) == 1  # no held-out evaluation on interrupt
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["state"]["batches_done"] == 0
    assert not list(run_dir.glob("checkpoints/*.tmp"))
    _resume_and_compare(run_dir, full_dir, _env(tmp_path))


def _nan_after(monkeypatch, good_calls: int, every: int | None = None):
    real = Criterion.__call__
    calls = {"n": 0}

    def fake(self, emb, labels, head):
        calls["n"] += 1
        loss = real(self, emb, labels, head)
        bad = calls["n"] > good_calls if every is None else calls["n"] % every == 0
        return loss * float("nan") if bad else loss

    monkeypatch.setattr(Criterion, "__call__", fake)


def _cfg(root: Path, out: Path, *extra: str):
    return load_config(REPO / "configs/siamese.yaml",
                       [*BASE, f"data.root={root}", f"output_dir={out}", "train.batch_size=8",
                        *extra])


def test_nan_losses_in_a_row_stop_with_clear_error_and_keep_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    _nan_after(monkeypatch, good_calls=2)  # epoch 1 has 2 steps, then only NaN
    with pytest.raises(NonFiniteLoss, match="2 non-finite losses in a row"):
        trainer.fit(_cfg(root, tmp_path / "exp", "train.epochs=3", "train.max_bad_steps=2"))
    last = next((tmp_path / "exp").glob("*/*/checkpoints/last.pt"))
    ckpt = load_checkpoint(last)
    assert ckpt["state"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_isolated_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    _nan_after(monkeypatch, good_calls=0, every=2)
    run_dir = trainer.fit(_cfg(root, tmp_path / "exp", "train.epochs=2"))
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["bad_steps"] == 2  # 4 batches over 2 epochs, every second one NaN
    assert summary["steps"] == 2


def test_two_process_ddp_matches_single_process(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    # crop_mode auto: rank 0 chooses the eval geometry and every rank takes its choice
    extra = ["train.epochs=2", "train.batch_size=16", "model.freeze_bn=true",
             "model.crop_mode=auto"]
    env = _env(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29517"]
    two = subprocess.run([*torchrun, *_train_cmd(root, tmp_path / "two", *extra)[1:]], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(_train_cmd(root, tmp_path / "one", *extra), env=env,
                         capture_output=True, text=True, check=True)
    dir_two = Path(two.stdout.strip().splitlines()[-1])
    dir_one = Path(one.stdout.strip().splitlines()[-1])
    assert len(list((tmp_path / "two").glob("*/*"))) == 1  # rank 0 alone writes a run folder
    assert two.stderr.count("model.crop_mode auto:") == 1
    chosen = {d: load_checkpoint(d / "checkpoints/last.pt")["config"]["model"]["crop_mode"]
              for d in (dir_one, dir_two)}  # fmt: skip
    assert chosen[dir_one] == chosen[dir_two] in ("center", "squash")
    a, b = _weights(dir_one), _weights(dir_two)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, f"2-process weights differ from 1-process by {worst}"
    ha = load_checkpoint(dir_one / "checkpoints/last.pt")["state"]["history"]
    hb = load_checkpoint(dir_two / "checkpoints/last.pt")["state"]["history"]
    assert ha[0]["loss"] == pytest.approx(hb[0]["loss"], rel=1e-5)


class _Noisy(torch.utils.data.Dataset):
    """Items drawn partly from the global torch RNG, as main-process augmentations are."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        return torch.full((4,), float(i % 5)) + torch.rand(4), i % 3, i


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop = torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)

    def forward(self, x, from_prefix=False):
        return self.lin(self.drop(x))


def _toy_epoch(net, state, opt_state=None, stop=None, log=None):
    """One epoch of `train_one_epoch` on a loader built afresh with a fixed seed, as `fit`
    builds one per epoch."""
    from mltrain.data.dataset import make_loader
    from mltrain.train.loop import LoopSettings, train_one_epoch

    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    settings = LoopSettings(device=torch.device("cpu"), amp_dtype=None, channels_last=False,
                            show_progress=False, stop=stop)
    loader = make_loader(_Noisy(), 4, shuffle=True, num_workers=0, drop_last=True, seed=7)
    loss = lambda emb, y, head: torch.nn.functional.cross_entropy(emb, y)  # noqa: E731
    return train_one_epoch(net, loss, loader, opt, None, state, settings, log), opt


def test_train_one_epoch_stops_on_flag_and_resumes_exactly(one_torch_thread):
    import copy
    import io
    import threading
    from dataclasses import asdict

    from mltrain.train.loop import StepState, rng_state

    torch.manual_seed(0)
    start = copy.deepcopy(_Net().state_dict())

    torch.manual_seed(1)  # what seed_everything does at the start of the epoch
    full = _Net()
    full.load_state_dict(start)
    full_stats, _ = _toy_epoch(full, StepState())

    torch.manual_seed(1)
    net, state, stop = _Net(), StepState(), threading.Event()
    net.load_state_dict(start)
    _, opt = _toy_epoch(net, state, stop=stop, log=lambda k, v, n: n == 3 and stop.set())
    assert state.step == 3 and state.batches_done == 3  # stopped right after step 3
    state.rng = rng_state()
    saved = {"model": net.state_dict(), "opt": opt.state_dict(), "state": asdict(state)}
    buf = io.BytesIO()
    torch.save(saved, buf)  # what a checkpoint holds, loaded the safe way
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    def resume(with_rng: bool):
        torch.manual_seed(1)
        resumed, state = _Net(), StepState(**saved["state"])
        resumed.load_state_dict(saved["model"])
        if not with_rng:
            state.rng = None
        stats, _ = _toy_epoch(resumed, state, saved["opt"])
        return resumed, state, stats

    resumed, state, stats = resume(with_rng=True)
    assert state.step == 6 and state.batches_done == 0  # a new epoch starts next
    for key, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[key]), key
    assert stats["loss"] == full_stats["loss"]
    without_rng, _, _ = resume(with_rng=False)  # the RNG restore is what makes it exact
    assert not torch.equal(without_rng.lin.weight, full.lin.weight)


def _signal_at_step(monkeypatch, step: int) -> None:
    """SIGTERM to this process right after optimizer step `step`, as a `kill` would."""
    from mltrain.train import loop as engine

    real = engine._optimizer_step

    def step_then_signal(model, optimizer, scheduler, state, cfg):
        real(model, optimizer, scheduler, state, cfg)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine, "_optimizer_step", step_then_signal)


def test_second_signal_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch,
                                                              one_torch_thread):
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    _signal_at_step(monkeypatch, 3)  # 2 steps per epoch: epoch 2, batch 1
    real_save = torch.save

    def save_then_signal(obj, f, *args, **kwargs):  # the interrupt's save, written, not renamed
        real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("state", {}).get("batches_done"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch, "save", save_then_signal)
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(_cfg(root, tmp_path / "exp", "train.epochs=3"))
    assert exit_info.value.code == 130
    folder = next((tmp_path / "exp").glob("*/*/checkpoints"))
    state = load_checkpoint(folder / "last.pt")["state"]
    assert (state["epoch"], state["batches_done"]) == (1, 0)  # the epoch-1 checkpoint, intact
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]  # no temp file
    assert signal.getsignal(signal.SIGTERM) is not None  # fit put the handlers back


def test_unwritable_output_folder_fails_before_any_work(tmp_path, monkeypatch):
    import errno
    import tempfile

    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o500)
    if os.geteuid() == 0:  # root writes anyway: make the probe fail as a read-only disk would
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    try:
        with pytest.raises(MltrainError, match=f"cannot write to {out}.*output_dir"):
            trainer.fit(_cfg(root, out))
    finally:
        out.chmod(0o700)
    assert not list(out.rglob("*.pt")) and not list(out.rglob("events.out.tfevents.*"))


def test_too_little_disk_space_fails_before_the_prefix_cache(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mltrain import files as storage

    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    free = 5 * 2**20
    monkeypatch.setattr(storage.shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=2**40, used=2**40 - free, free=free))
    cfg = _cfg(root, tmp_path / "exp", "train.cache_frozen=true", "model.trainable_stages=null",
               "model.frozen_stages=3")
    with pytest.raises(MltrainError, match="not enough disk space") as error:
        trainer.fit(cfg)
    message = str(error.value)
    assert f"{tmp_path / 'exp'}" in message and "prefix cache" in message
    assert "MLTRAIN_CACHE" in message and f"{free:,} bytes" in message
    assert not list((tmp_path / "exp").glob("*/*"))  # no stub run folder is left behind
    assert not (tmp_path / "cache").exists()  # the prefix cache was not computed


def test_full_disk_while_saving_says_previous_checkpoint_is_intact(tmp_path, monkeypatch,
                                                                   one_torch_thread):
    import errno

    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    from mltrain.train import checkpoints

    real = checkpoints.atomic_save

    def full_from_epoch_2(obj, path):
        if obj["state"]["epoch"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_save", full_from_epoch_2)
    with pytest.raises(MltrainError, match="No space left.*last.pt is intact.*--resume"):
        trainer.fit(_cfg(root, tmp_path / "exp", "train.epochs=3"))
    last = next((tmp_path / "exp").glob("*/*/checkpoints/last.pt"))
    assert load_checkpoint(last)["state"]["epoch"] == 1


def test_the_prefix_cache_evicts_the_least_recently_used_past_its_cap(tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    """A prefix cache that grew large (12 GB in ~/.cache/mltrain/prefix) stays under
    MLTRAIN_CACHE_GB: the entries used least recently go, the new one and recent hits stay."""
    import torch

    from mltrain.train import prefix_cache

    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "prefix"
    entry = lambda key: folder / f"{prefix_cache.cache_key(key)}.pt"  # noqa: E731
    for i, key in enumerate(({"a": 1}, {"b": 2}, {"c": 3})):
        prefix_cache.cached(key, lambda: (torch.zeros(256),))
        os.utime(entry(key), ns=(i * 10**9, i * 10**9))  # a oldest, c newest
    assert capsys.readouterr().err == ""  # the default 20 GiB: nothing goes
    size = entry({"a": 1}).stat().st_size
    first = prefix_cache.cached({"a": 1}, lambda: pytest.fail("recomputed"))  # a hit: touched
    monkeypatch.setenv("MLTRAIN_CACHE_GB", str(2.5 * size / 2**30))  # room for two entries
    prefix_cache.cached({"d": 4}, lambda: (torch.ones(256),))
    assert sorted(folder.glob("*.pt")) == sorted([entry({"a": 1}), entry({"d": 4})])
    err = capsys.readouterr().err
    assert err.startswith(f"note: the prefix cache {folder} passed its cap of ")
    gone = size_text(2 * size)  # the two entries are the same size
    assert f"(MLTRAIN_CACHE_GB): removed the 2 files used least recently ({gone})" in err
    assert err.count("\n") == 1
    again = prefix_cache.cached({"a": 1}, lambda: pytest.fail("recomputed"))
    assert torch.equal(first[0], again[0])
    monkeypatch.setenv("MLTRAIN_CACHE_GB", str(0.5 * size / 2**30))  # smaller than one entry
    stale, fresh = folder / ".x.pt.1.tmp", folder / ".y.pt.2.tmp"  # left by killed writes
    stale.write_bytes(b"0" * 10)
    fresh.write_bytes(b"0" * 10)
    os.utime(stale, (0, 0))
    prefix_cache.cached({"e": 5}, lambda: (torch.ones(256),))
    assert list(folder.glob("*.pt")) == [entry({"e": 5})]  # the new entry always stays
    assert fresh.exists() and not stale.exists()  # a write may still be going on: a day old


def test_eviction_passes_over_a_file_it_cannot_remove(tmp_path, monkeypatch, capsys):
    """Another user's entry in a shared cache (or one already gone) only costs space."""
    import torch

    from mltrain.train import prefix_cache

    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    prefix_cache.cached({"a": 1}, lambda: (torch.zeros(256),))
    prefix_cache.cached({"b": 2}, lambda: (torch.zeros(256),))
    real_unlink = Path.unlink

    def refuse(self, missing_ok=False):
        if self.name.startswith(prefix_cache.cache_key({"a": 1})):
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    monkeypatch.setenv("MLTRAIN_CACHE_GB", "1e-9")  # 1 byte: everything but the new entry
    out = prefix_cache.cached({"c": 3}, lambda: (torch.ones(2),))
    assert torch.equal(out[0], torch.ones(2))
    names = sorted(f.name for f in (tmp_path / "cache" / "prefix").glob("*.pt"))
    keys = sorted(f"{prefix_cache.cache_key(k)}.pt" for k in ({"a": 1}, {"c": 3}))
    assert names == keys
    assert "removed the 1 file used least recently" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan", "inf"])
def test_a_bad_cache_cap_is_refused_before_training(tmp_path, monkeypatch, value):
    from mltrain.train import prefix_cache

    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLTRAIN_CACHE_GB", value)
    with pytest.raises(ConfigError, match=f"^MLTRAIN_CACHE_GB='{value}': give the most GiB"):
        prefix_cache.cache_limit()
    with pytest.raises(ConfigError, match="MLTRAIN_CACHE_GB"):
        trainer.fit(_cfg(root, tmp_path / "exp", "train.epochs=1"))
    assert not (tmp_path / "cache").exists()


def test_a_cap_below_the_runs_own_entries_is_noted_before_training(tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLTRAIN_CACHE_GB", "1e-9")
    run_dir = trainer.fit(_cfg(root, tmp_path / "exp", "train.epochs=1"))
    note = "exceed the cache's cap of 1 byte (MLTRAIN_CACHE_GB): later runs will compute"
    assert note in capsys.readouterr().err and note in (run_dir / "notes.txt").read_text()


def test_sigterm_interrupts_setup_and_the_callers_handlers_come_back():
    """During setup SIGTERM stops at once, as Ctrl-C does; afterwards, even after an error,
    the handlers installed before the run are back."""
    from mltrain.train.signals import setup_handlers

    def mine(signum, frame):
        return None

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(KeyboardInterrupt), setup_handlers():
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
