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

from mltrain import trainer
from mltrain.checkpoint import load_checkpoint
from mltrain.config import load_config
from mltrain.engine import NonFiniteLoss
from mltrain.losses import Criterion
from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "model.pretrained=false",
    "model.image_size=32",
    "data.exclude_classes=[]",
    "data.num_workers=0",
    "eval.batch_size=32",
    "train.amp=off",
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


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=6, per_class=16, size=(48, 48))
    extra = ["train.epochs=4", "train.batch_size=8", "model.frozen_stages=0",
             "train.cache_frozen=false"]
    env = _env(tmp_path)
    full = subprocess.run(_train_cmd(root, tmp_path / "full", *extra), env=env,
                          capture_output=True, text=True, check=True)
    full_dir = Path(full.stdout.strip().splitlines()[-1])

    proc = subprocess.Popen(_train_cmd(root, tmp_path / "killed", *extra), env=env,
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

    resumed = subprocess.run([*_train_cmd(root, tmp_path / "unused")[:2], "--resume",
                              str(run_dir)], env=env, capture_output=True, text=True, check=True)
    assert Path(resumed.stdout.strip().splitlines()[-1]) == run_dir
    a, b = _weights(full_dir), _weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"
    ma = json.loads((full_dir / "metrics.json").read_text())["final"]
    mb = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert ma["precision_at_1"] == mb["precision_at_1"] and ma["map_at_r"] == mb["map_at_r"]


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
    extra = ["train.epochs=2", "train.batch_size=16", "model.freeze_bn=true"]
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
    a, b = _weights(dir_one), _weights(dir_two)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, f"2-process weights differ from 1-process by {worst}"
    ha = load_checkpoint(dir_one / "checkpoints/last.pt")["state"]["history"]
    hb = load_checkpoint(dir_two / "checkpoints/last.pt")["state"]["history"]
    assert ha[0]["loss"] == pytest.approx(hb[0]["loss"], rel=1e-5)
