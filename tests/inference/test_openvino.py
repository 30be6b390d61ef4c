"""The OpenVINO runner: parity with PyTorch fp32 on both of its paths (one synchronous
request, requests in flight together), refusal and fallback to torch, the `auto` choice, and
a search through a bundle with `--backend openvino`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mltrain.config import Config, load_config
from mltrain.errors import ConfigError, MltrainError
from mltrain.inference import backends
from mltrain.inference import embedder as embedder_mod
from mltrain.inference.embedder import make_embedder
from mltrain.inference.onnx import export_bytes, noise_probe
from mltrain.model.network import build_model
from tests.conftest import gallery, tiny_embedder, write_image_folder

pytest.importorskip("openvino")
ov_mod = pytest.importorskip("mltrain.inference.openvino")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(root, backend: str = "openvino", workers: int = 0) -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.pretrained, cfg.model.image_size = "test_efficientnet", False, 32
    cfg.data.root, cfg.data.exclude_classes, cfg.data.num_workers = str(root), [], workers
    cfg.eval.amp, cfg.eval.backend, cfg.eval.cpu_chunk = "off", backend, 4
    return cfg


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return gallery(write_image_folder(tmp_path_factory.mktemp("ov") / "data", 3, 5, (40, 32)))


def embedder_for(root, backend: str = "openvino", workers: int = 0):
    torch.manual_seed(0)
    cfg = tiny_cfg(root, backend, workers)
    return make_embedder(cfg, build_model(cfg.model))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("from_graph", [True, False])
def test_runner_reproduces_pytorch_on_both_paths(from_graph):
    torch.manual_seed(0)
    net = build_model(tiny_cfg("").model).eval()
    probe = noise_probe((3, 32, 32), n=4)
    graph = export_bytes(net, probe) if from_graph else None
    runner, cos = ov_mod.checked_runner(net, probe, graph, chunk=4)
    need = ov_mod.BF16_MIN if runner.precision == "bf16" else ov_mod.PARITY_MIN
    assert cos >= need
    x = torch.randn(11, 3, 32, 32)  # 11 > chunk: three chunks over the requests, in order
    with torch.inference_mode():
        want = net.embed(x).numpy()
    for got in (runner.embed(x), torch.cat([runner(x[i : i + 1]) for i in range(11)])):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert cosines(got.numpy(), want).min() >= need
    assert set(runner._compiled) == {"LATENCY", "THROUGHPUT"}  # both paths really ran


@pytest.mark.parametrize("workers", [0, 2])
def test_embedder_on_openvino_matches_torch(images, workers):
    """Loader workers forked after OpenVINO started only decode; the runner stays here."""
    root = images[0].parents[1]
    ov_emb = embedder_for(root, "openvino", workers)
    torch_emb = embedder_for(root, "torch", workers)
    got, want = ov_emb.embed(images), torch_emb.embed(images)
    runner = ov_emb.for_job(len(images), 8)
    assert runner.backend == "openvino" and not runner.spec.in_workers
    assert cosines(got, want).min() >= ov_mod.BF16_MIN
    streamed = np.concatenate(list(ov_emb.embed_batches(images)))
    np.testing.assert_allclose(streamed, got, atol=1e-5)
    one = ov_emb.embed_arrays([np.full((40, 32, 3), 90, np.uint8)])
    assert one.shape == (1, got.shape[1])


def test_a_refused_runner_falls_back_to_torch_after_one_note(images, monkeypatch, capsys):
    real = ov_mod.OpenVinoModel.embed

    def wrong(self, x, from_prefix=False):
        out = real(self, x)
        return out + torch.randn_like(out)

    monkeypatch.setattr(ov_mod.OpenVinoModel, "embed", wrong)
    root = images[0].parents[1]
    emb = embedder_for(root, "openvino")
    got = emb.embed(images)
    again = emb.embed(images[:3])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: OpenVINO")
    assert "refused" in err[0] and "embedding with torch instead" in err[0]
    np.testing.assert_allclose(got, embedder_for(root, "torch").embed(images), atol=1e-5)
    np.testing.assert_allclose(again, got[:3], atol=1e-5)
    assert emb.for_job(100, 8).backend == "torch"


def test_missing_openvino_is_one_line_when_asked_and_silent_under_auto(images, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr(ov_mod, "openvino_available", lambda: False)
    monkeypatch.setattr(embedder_mod, "openvino_available", lambda: False)
    root = images[0].parents[1]
    with pytest.raises(ov_mod.OpenVinoUnavailable, match=r"pip install -e '\.\[openvino\]'"):
        embedder_for(root, "openvino")
    auto = embedder_for(root, "auto")
    assert auto.for_job(1_000_000, 64).backend == "torch"
    assert auto.embed(images).shape[0] == len(images)
    assert capsys.readouterr().err == ""


def test_auto_takes_the_least_measured_time_for_the_job(images, monkeypatch):
    for images_n, per_call, traced in ((1, 1, True), (20, 1, False), (50_000, 64, True)):
        runners = list(backends.RUNNERS)
        best = backends.fastest(runners, images_n, per_call, traced)
        seconds = {r: backends.job_seconds(r, images_n, per_call, traced) for r in runners}
        assert seconds[best] == min(seconds.values())
    # The bulk figures make OpenVINO worth its setup (trace included) for a large folder only.
    assert backends.fastest(["torch", "openvino"], 50_000, 64, traced=True) == "openvino"
    assert backends.fastest(["torch", "openvino"], 10, 10, traced=True) == "torch"
    monkeypatch.setattr(backends, "COSTS", {**backends.COSTS,
                        "openvino": backends.Cost(0.0, 1.0, 1.0)})  # fmt: skip
    monkeypatch.setattr(backends, "TRACE_S", 0.0)
    assert backends.fastest(["torch", "openvino"], 10, 10) == "openvino"
    root = images[0].parents[1]
    auto = embedder_for(root, "auto")
    assert auto.for_job(10, 10).backend == "openvino"
    assert auto.for_job(10, 10) is auto.for_job(3, 3)  # compiled and checked once


def test_eval_backend_takes_only_known_runners():
    assert load_config(overrides=["eval.backend=openvino"]).eval.backend == "openvino"
    with pytest.raises(ConfigError, match="eval.backend"):
        load_config(overrides=["eval.backend=tensorrt"])


def test_search_through_a_bundle_on_openvino_gives_the_torch_hits(tmp_path, capsys):
    from mltrain.commands.search import script as search
    from mltrain.retrieval.export import export_bundle

    root = write_image_folder(tmp_path / "data", 3, 4, (32, 32))
    emb = tiny_embedder(root)
    bundle = export_bundle(emb, tmp_path / "b", "test")
    queries = [str(p) for p in gallery(root)[::3]]
    docs = {}
    for backend in ("torch", "openvino"):
        assert search([str(bundle), *queries, "-k", "3", "--json", "--backend", backend]) == 0
        docs[backend] = json.loads(capsys.readouterr().out)
        assert docs[backend]["backend"] == backend
    for t, o in zip(docs["torch"]["queries"], docs["openvino"]["queries"], strict=True):
        assert [h["row"] for h in t["results"]][:1] == [h["row"] for h in o["results"]][:1]
        np.testing.assert_allclose([h["score"] for h in o["results"]],
                                   [h["score"] for h in t["results"]], atol=0.02)  # bf16 queries


def test_openvino_embeds_images_not_prefix_features():
    torch.manual_seed(0)
    net = build_model(tiny_cfg("").model).eval()
    runner, _ = ov_mod.checked_runner(net, noise_probe((3, 32, 32), n=2))
    with pytest.raises(MltrainError, match="not cached prefix features"):
        runner.embed(torch.zeros(1, 3, 32, 32), from_prefix=True)


def test_without_the_tracer_openvino_converts_the_model_itself(monkeypatch):
    def no_tracer(*args, **kwargs):
        raise MltrainError("no tracer here")

    monkeypatch.setattr(ov_mod, "export_bytes", no_tracer)
    torch.manual_seed(0)
    net = build_model(tiny_cfg("").model).eval()
    probe = noise_probe((3, 32, 32), n=2)
    assert not isinstance(ov_mod.from_torch(net, probe), bytes)  # openvino's own converter
    runner, cos = ov_mod.checked_runner(net, probe)
    assert cos >= (ov_mod.BF16_MIN if runner.precision == "bf16" else ov_mod.PARITY_MIN)


FREED_THEN_FORKED = """
import subprocess, sys, torch
from dataclasses import replace
from pathlib import Path
from mltrain.config import Config
from mltrain.inference import batching
from mltrain.inference.embedder import make_embedder
from mltrain.model.network import build_model
from tests.conftest import gallery, write_image_folder

torch.set_num_threads(1)
batching.usable_cpus = lambda: 2  # the torch pass runs the model in 2 forked workers
root = write_image_folder(Path(sys.argv[1]), 3, 8, (48, 40))
cfg = Config()
cfg.model.backbone, cfg.model.pretrained, cfg.model.image_size = "test_efficientnet", False, 32
cfg.data.root, cfg.data.exclude_classes, cfg.data.num_workers = str(root), [], 2
cfg.eval.batch_size, cfg.eval.amp, cfg.eval.backend = 8, "off", "torch"
emb = make_embedder(cfg, build_model(cfg.model))
for _ in range(2):  # two runners built, used and dropped
    replace(emb, backend="openvino", _on={}).embed(gallery(root))
emb.embed(gallery(root))  # 3 batches: the loader forks its workers, which run the model
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("ok")
"""


def test_runners_dropped_before_a_fork_leave_the_process_whole(tmp_path):
    """Freed OpenVINO models and a fork afterwards crashed the process (SIGSEGV); runners
    are kept until exit. In a process of its own, so a crash fails only this test."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", FREED_THEN_FORKED, str(tmp_path / "data")],
                          cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
