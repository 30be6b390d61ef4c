"""ONNX export and the onnxruntime backend: parity with PyTorch fp32, refusal of a graph
that disagrees, and every Embedder path (plain, streamed, forked workers) through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mltrain.config import Config
from mltrain.errors import MltrainError
from mltrain.inference.embedder import make_embedder
from mltrain.model.network import build_model
from tests.conftest import write_image_folder

ort = pytest.importorskip("onnxruntime")
onnx_mod = pytest.importorskip("mltrain.inference.onnx")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(root=None, **model) -> Config:
    cfg = Config()
    cfg.model.backbone = "tf_efficientnet_lite0"
    cfg.model.pretrained = False
    cfg.model.image_size = 64
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.data.root = str(root) if root else ""
    cfg.data.exclude_classes = []
    cfg.data.num_workers = 0
    return cfg


@pytest.mark.parametrize("model", [
    {},
    {"pooling": {"name": "gem"}, "embedding_dim": 16},
    {"pooling": {"name": "gem"}, "embedding_dim": 16, "head": True, "bnneck": True,
     "normalize": False},
    {"pooling": {"name": "grid", "args": {"size": 2}}},  # 64 px: a 2 x 2 final map
])  # fmt: skip
def test_random_model_parity_with_a_dynamic_batch(model):
    torch.manual_seed(0)
    net = build_model(tiny_cfg(**model).model, num_classes=5).eval()
    probe = onnx_mod.noise_probe((3, 64, 64), n=3)
    graph, parity = onnx_mod.export_checked(net, probe, "noise")
    assert parity.worst_cosine >= 0.9999 and parity.probe_images == 3
    session = onnx_mod.OnnxSession(graph, net.normalize)
    for n in (1, 5):  # batch sizes other than the traced one
        x = torch.randn(n, 3, 64, 64)
        with torch.inference_mode():
            want = net.embed(x)
        got = session(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.9999


def test_pretrained_lite0_parity_on_real_weights(tmp_path):
    root = write_image_folder(tmp_path / "data", 2, 2, (96, 80))
    cfg = tiny_cfg(root, pretrained="offline", image_size=None)
    emb = make_embedder(cfg, build_model(cfg.model))
    x = next(iter(emb._loader(sorted(root.rglob("img_*")), None)))[0]
    graph, parity = onnx_mod.export_checked(emb.model, x, "gallery")
    assert parity.worst_cosine >= 0.9999 and parity.probe_images == 4
    assert len(graph) > 10_000_000  # the real weights are in the graph


def test_export_refuses_a_graph_that_disagrees(monkeypatch):
    net = build_model(tiny_cfg().model).eval()
    real = onnx_mod.OnnxSession.embed

    def perturbed(self, x, from_prefix=False):
        out = real(self, x)
        return out + 0.5 * torch.randn_like(out)

    monkeypatch.setattr(onnx_mod.OnnxSession, "embed", perturbed)
    with pytest.raises(MltrainError, match=r"ONNX export refused.*worst cosine 0\.\d+ < 0.9999"):
        onnx_mod.export_checked(net, onnx_mod.noise_probe((3, 64, 64)), "noise")


@pytest.mark.parametrize("workers", [0, 2])
def test_embedder_onnx_backend_matches_torch_on_every_path(tmp_path, workers, monkeypatch):
    """Forked loader workers (`eval.model_in_workers`) build their own session."""
    from mltrain.inference import batching

    monkeypatch.setattr(batching, "usable_cpus", lambda: 2)
    moved = []
    real_in_workers = batching._in_workers
    monkeypatch.setattr(batching, "_in_workers",
                        lambda *a: moved.append(1) or real_in_workers(*a))  # fmt: skip
    root = write_image_folder(tmp_path / "data", 2, 3, (40, 32))
    cfg = tiny_cfg(root)
    cfg.eval.amp = "off"
    cfg.data.num_workers = workers
    cfg.eval.flip_tta = workers > 0  # the mirrored pass goes through the session too
    torch.manual_seed(0)
    emb = make_embedder(cfg, build_model(cfg.model))
    paths = sorted(root.rglob("img_*"))
    graph, _ = onnx_mod.export_checked(emb.model, onnx_mod.noise_probe((3, 64, 64)), "noise")
    fast = emb.with_backend("onnx", onnx_mod.OnnxSession(graph, emb.model.normalize))
    assert fast.spec.amp is None and not fast.spec.channels_last
    assert isinstance(fast.forward_model, onnx_mod.OnnxSession)
    want = emb.embed(paths)
    got = fast.embed(paths)
    streamed = np.concatenate(list(fast.embed_batches(paths)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(streamed, got, atol=1e-6)
    assert bool(moved) == (workers > 0)  # the forked-worker path really ran


def test_missing_onnxruntime_is_one_line_naming_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(MltrainError, match=r"pip install -e '\.\[onnx\]'"):
        onnx_mod.OnnxSession(b"", True)


FORK_AFTER_USE = """
import sys, time, torch
from mltrain.inference import batching
from mltrain.inference.embedder import make_embedder
from mltrain.inference.onnx import OnnxSession, export_checked, noise_probe
from mltrain.model.network import build_model
from tests.conftest import write_image_folder
from tests.inference.test_onnx import tiny_cfg

batching.usable_cpus = lambda: 2
root = write_image_folder(sys.argv[1], 2, 2, (40, 32))
cfg = tiny_cfg(root)
cfg.data.num_workers, cfg.eval.amp = 2, "off"
emb = make_embedder(cfg, build_model(cfg.model))
graph, _ = export_checked(emb.model, noise_probe((3, 64, 64)), "noise")
fast = emb.with_backend("onnx", OnnxSession(graph, True, threads=2))
for _ in range(2):
    fast.forward_model.embed(torch.randn(2, 3, 64, 64))  # the parent's session and pool
    time.sleep(1)  # its threads park on their condition variable
    fast.embed(sorted(root.rglob("img_*")))  # forks workers that inherit it
print("ok")
"""


def test_workers_forked_after_the_parent_used_its_session_do_not_hang(tmp_path):
    """A child that freed its inherited session hung in pthread_cond_destroy (the parent's
    pool threads do not exist in it); run in a process with a timeout so a hang fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_WAIT_POLICY": "PASSIVE",
           "TQDM_DISABLE": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", FORK_AFTER_USE, str(tmp_path / "data")],
                          cwd=repo, env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
