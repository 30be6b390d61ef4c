"""Inference placement (mltrain.inference.batching): chunked calls and the model run in loader
workers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mltrain.config import load_config
from mltrain.data.pipeline import inference_workers
from mltrain.errors import ConfigError, DataError, MltrainError
from mltrain.inference import batching as forward
from mltrain.inference.batching import apply, batches
from mltrain.runtime import InferSpec

CPU = torch.device("cpu")


class Tensors(Dataset):
    """(image-like tensor, label, index) like `ImageDataset`; raises at `bad`, as a broken
    file would."""

    def __init__(self, n: int = 22, bad: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.bad = bad

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.bad:
            raise DataError(f"image {i}: cannot decode, delete or replace it")
        return self.x[i], i % 3, i


@pytest.fixture(autouse=True)
def _two_cores_on_linux(monkeypatch):
    """The tests fork 2 workers; the model moves only with a worker per core."""
    monkeypatch.setattr(forward, "usable_cpus", lambda: 2)
    monkeypatch.setattr(forward, "workers_can_run_model", lambda: True)


def loader(dataset: Dataset, workers: int, batch: int = 4) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, num_workers=workers)


def run(fn, data: DataLoader, spec: InferSpec):
    outs, ys, idx = zip(*batches(fn, data, spec), strict=True)
    return torch.cat(outs), torch.cat(ys), torch.cat(idx)


def pid_fn(x: torch.Tensor) -> torch.Tensor:
    return torch.full((len(x), 1), float(os.getpid()))


def test_apply_feeds_the_model_in_chunks_on_cpu():
    seen: list[int] = []

    def fn(x):
        seen.append(len(x))
        return x.flatten(1).sum(1, keepdim=True)

    x = torch.randn(7, 3, 4, 4)
    whole = apply(fn, x, InferSpec(CPU, None, cpu_chunk=0))
    chunked = apply(fn, x, InferSpec(CPU, None, cpu_chunk=3))
    assert seen == [7, 3, 3, 1]
    torch.testing.assert_close(chunked, whole)


def test_model_runs_in_the_workers_with_one_thread_each_and_keeps_order():
    conv = torch.nn.Conv2d(3, 5, 3).eval()

    def fn(x):
        feats = conv(x).mean((2, 3))
        tag = torch.tensor([[float(os.getpid()), float(torch.get_num_threads())]])
        return torch.cat([feats, tag.expand(len(x), 2)], 1)

    spec = InferSpec(CPU, None, cpu_chunk=3, in_workers=True)
    moved, y, idx = run(fn, loader(Tensors(), 2), spec)
    here, y0, idx0 = run(fn, loader(Tensors(), 0), spec)
    torch.testing.assert_close(moved[:, :5], here[:, :5], rtol=1e-5, atol=1e-6)
    assert idx.tolist() == list(range(22)) and torch.equal(y, y0) and torch.equal(idx, idx0)
    pids = set(moved[:, 5].long().tolist())
    assert len(pids) == 2 and os.getpid() not in pids
    assert set(moved[:, 6].tolist()) == {1.0}
    assert set(here[:, 5].long().tolist()) == {os.getpid()}


def test_each_call_forks_workers_that_see_the_current_weights():
    lin = torch.nn.Linear(3 * 8 * 8, 2)
    spec = InferSpec(CPU, None, in_workers=True)
    data = loader(Tensors(), 2)
    fn = lambda x: lin(x.flatten(1))  # noqa: E731
    before = run(fn, data, spec)[0]
    with torch.no_grad():
        lin.bias += 10.0
    after = run(fn, data, spec)[0]
    torch.testing.assert_close(after, before + 10.0)


@pytest.mark.parametrize("why", ["not linux", "no workers", "not asked", "fewer than cores"])
def test_model_stays_in_this_process_when_workers_cannot_take_it(monkeypatch, why):
    if why == "not linux":
        monkeypatch.setattr(forward, "workers_can_run_model", lambda: False)
    if why == "fewer than cores":  # 2 one-thread workers would leave 6 cores idle
        monkeypatch.setattr(forward, "usable_cpus", lambda: 8)
    spec = InferSpec(CPU, None, in_workers=why != "not asked")
    out = run(pid_fn, loader(Tensors(), 0 if why == "no workers" else 2), spec)[0]
    assert set(out[:, 0].long().tolist()) == {os.getpid()}


def test_model_stays_in_this_process_on_a_gpu():
    assert forward._can_move(loader(Tensors(), 2), InferSpec(CPU, None, in_workers=True))
    cuda = InferSpec(torch.device("cuda"), None, in_workers=True)
    assert not forward._can_move(loader(Tensors(), 2), cuda)


def test_a_worker_error_reaches_the_caller_with_its_message():
    spec = InferSpec(CPU, None, in_workers=True)
    with pytest.raises(DataError, match="image 9: cannot decode"):
        run(pid_fn, loader(Tensors(bad=9), 2), spec)


def broken_model(x: torch.Tensor) -> torch.Tensor:
    raise MltrainError("embeddings contain NaN/inf; the checkpoint's weights are broken")


def test_a_model_error_inside_a_worker_reaches_the_caller():
    spec = InferSpec(CPU, None, in_workers=True)
    with pytest.raises(MltrainError, match="weights are broken"):
        run(broken_model, loader(Tensors(), 2), spec)


def test_inference_workers_follow_config_and_core_count(monkeypatch):
    monkeypatch.setattr("mltrain.data.pipeline.usable_cpus", lambda: 40)
    monkeypatch.setattr("mltrain.data.pipeline.workers_can_run_model", lambda: True)
    cfg = load_config(None, ["eval.batch_size=8", "train.device=cpu"])
    assert inference_workers(cfg, 16) == 16  # one per core, at most 16
    assert inference_workers(cfg, 15) == 0  # fewer than 2 batches: not worth forking
    cfg.data.num_workers = 3
    assert inference_workers(cfg, 1000) == 3
    cfg.data.num_workers, cfg.eval.model_in_workers = None, False
    assert inference_workers(cfg, 1000) is None  # the loader's own default


def test_negative_cpu_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.cpu_chunk"):
        load_config(None, ["eval.cpu_chunk=-1"])


def test_embedder_output_does_not_depend_on_placement(tiny_folder):
    """The real path: decode + model in workers equals decode in workers + model here."""
    from mltrain.data.folder import scan_folder
    from mltrain.inference.embedder import embedder_from_backbone

    folder = scan_folder(tiny_folder)
    base = [
        "model.backbone=tf_efficientnet_lite0",
        "model.pretrained=false",
        "eval.amp=off",
        "eval.batch_size=4",
        "data.num_workers=2",
        "model.image_size=64",
    ]
    outs = []
    for where in ("true", "false"):
        cfg = load_config(None, [*base, f"eval.model_in_workers={where}"])
        torch.manual_seed(0)
        outs.append(embedder_from_backbone(cfg).embed(folder.paths))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_training_run_caches_and_evaluates_in_workers(tmp_path, monkeypatch):
    """Prefix cache and held-out evaluation go through the workers and agree with the
    in-process path."""
    from mltrain.train import run as trainer
    from tests.conftest import TINY_RUN, write_image_folder

    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    calls = []
    real = forward._in_workers
    monkeypatch.setattr(forward, "_in_workers", lambda *a: calls.append(1) or real(*a))  # type: ignore[func-returns-value]
    finals = []
    for where in ("true", "false"):
        monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / f"cache_{where}"))
        cfg = load_config(
            "configs/classification.yaml",
            [
                *TINY_RUN,
                f"data.root={root}",
                f"output_dir={tmp_path / where}",
                "train.epochs=1",
                "data.num_workers=2",
                "eval.batch_size=4",
                "eval.amp=off",
                "train.amp=off",
                "model.trainable_stages=null",
                "model.frozen_stages=5",
                "train.cache_views=1",
                f"eval.model_in_workers={where}",
            ],
        )
        run_dir = trainer.fit(cfg)
        finals.append(json.loads((run_dir / "metrics.json").read_text())["final"])
        if where == "true":
            # the held-out images squashed (crop_mode auto's second look), train view,
            # held-out prefix, and the whitening fit's training images, held-out mirrors and
            # training mirrors (the config flips; the cached tail: no workers)
            assert len(calls) == 6
    assert len(calls) == 6  # nothing more with model_in_workers=false
    assert finals[0]["loss"] == pytest.approx(finals[1]["loss"], rel=1e-4)


def test_flip_tta_averages_the_image_and_its_mirror(tiny_folder):
    from mltrain.data.folder import scan_folder
    from mltrain.inference.embedder import embedder_from_backbone

    paths = scan_folder(tiny_folder).paths[:4]
    base = ["model.pretrained=false", "eval.amp=off", "eval.fold_bn=false", "data.num_workers=0",
            "model.image_size=32"]  # fmt: skip
    torch.manual_seed(0)
    plain = embedder_from_backbone(load_config(None, base))
    torch.manual_seed(0)
    flipped = embedder_from_backbone(load_config(None, [*base, "eval.flip_tta=true"]))
    x = torch.stack([plain._loader(paths, None).dataset[i][0] for i in range(4)])
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            plain.model.embed(x) + plain.model.embed(x.flip(3)), dim=1
        )
    got = flipped.embed(paths)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, plain.embed(paths), atol=1e-3)  # the mirror changed something
