"""Bundles with model.onnx: written by `export --onnx`, checked on load, searched with
`--backend onnx` (same hits as torch), refused when altered, absent or failing parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mltrain.retrieval.bundle_model as bundle_model
from mltrain.commands.search import script as main
from mltrain.errors import BundleError, MltrainError
from mltrain.files import sha256_file
from mltrain.model.network import build_model
from mltrain.retrieval.add import add_images
from mltrain.retrieval.bundle import ONNX, load_bundle
from mltrain.retrieval.bundle_model import bundle_embedder, choose_backend
from mltrain.retrieval.export import export_bundle
from tests.conftest import tiny_embedder, write_image_folder

pytest.importorskip("onnxruntime")
onnx_mod = pytest.importorskip("mltrain.inference.onnx")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LITE0 = "tf_efficientnet_lite0"  # random weights: the real graph, no download


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(image root, bundle with model.onnx, bundle without) over 3 classes x 4 images."""
    base = tmp_path_factory.mktemp("onnx")
    root = write_image_folder(base / "data", 3, 4, (32, 32))
    emb = tiny_embedder(root, LITE0)
    with_onnx = export_bundle(emb, base / "with", "test", onnx=True)
    without = export_bundle(emb, base / "without", "test")
    return root, with_onnx, without


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def queries(root: Path) -> list[str]:
    return [str(p) for p in sorted(root.rglob("img_*"))[::3]]


def test_export_writes_a_hashed_graph_and_its_parity(exported):
    _, bundle, _ = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["files"][ONNX] == sha256_file(bundle / ONNX)
    rec = manifest["onnx"]
    assert rec["worst_cosine"] >= 0.9999 and rec["probe"] == "gallery"
    assert rec["probe_images"] == 8  # spread over the 12 gallery images
    assert rec["opset"] == onnx_mod.OPSET and rec["onnxruntime"] == onnx_mod.ort_version()
    assert load_bundle(bundle).has_onnx


def test_search_onnx_gives_the_torch_hits_and_scores(exported, capsys):
    root, bundle, _ = exported
    docs = {}
    for backend in ("torch", "onnx"):
        assert main([str(bundle), *queries(root), "-k", "3", "--json",
                     "--backend", backend]) == 0  # fmt: skip
        docs[backend] = json.loads(capsys.readouterr().out)
        assert docs[backend]["backend"] == backend
    for t, o in zip(docs["torch"]["queries"], docs["onnx"]["queries"], strict=True):
        assert [h["row"] for h in t["results"]] == [h["row"] for h in o["results"]]
        np.testing.assert_allclose([h["score"] for h in o["results"]],
                                   [h["score"] for h in t["results"]], atol=1e-4)  # fmt: skip


def test_onnx_embedder_reproduces_the_stored_embeddings(exported):
    root, bundle, _ = exported
    b = load_bundle(bundle)
    emb = bundle_embedder(b, "onnx")
    assert emb.backend == "onnx" and bundle_embedder(b, "onnx") is emb  # built once
    assert bundle_embedder(b, "torch").model is emb.model  # one PyTorch model for both
    paths = sorted(root.rglob("img_*"))
    np.testing.assert_allclose(emb.embed(paths), b.embeddings, atol=1e-4)


def test_auto_takes_onnx_only_where_measured_faster(exported, monkeypatch):
    _, bundle, without = exported
    b, plain = load_bundle(bundle), load_bundle(without)
    assert choose_backend(b) == ("onnx" if bundle_model.AUTO_PREFERS_ONNX else "torch")
    assert bundle_embedder(plain).backend == "torch"  # the serve path: default argument
    monkeypatch.setattr(bundle_model, "AUTO_PREFERS_ONNX", True)
    assert choose_backend(b) == "onnx" and choose_backend(plain) == "torch"
    monkeypatch.setattr(onnx_mod, "onnxruntime_available", lambda: False)
    assert choose_backend(b) == "torch"


def test_bundle_without_graph_asked_for_onnx_says_to_reexport(exported, capsys):
    root, _, without = exported
    assert main([str(without), queries(root)[0], "--backend", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"has no {ONNX}" in err and "--onnx" in err


@pytest.mark.parametrize("how", ["flip a byte", "replace"])
def test_altered_graph_is_refused_naming_it(exported, tmp_path, capsys, how):
    root, bundle, without = exported
    copy = copy_of(bundle, tmp_path)
    if how == "flip a byte":
        data = bytearray((copy / ONNX).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / ONNX).write_bytes(bytes(data))
    else:  # another (valid) export's graph
        other = onnx_mod.export_bytes(build_model(tiny_embedder(root, LITE0).cfg.model),
                                      torch.randn(2, 3, 32, 32))  # fmt: skip
        (copy / ONNX).write_bytes(other)
    with pytest.raises(BundleError, match=rf"{ONNX} does not match its sha256"):
        load_bundle(copy)
    assert main([str(copy), queries(root)[0], "--backend", "torch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ONNX in err and "re-export" in err


def test_graph_swapped_after_loading_is_refused_before_use(exported, tmp_path):
    _, bundle, _ = exported
    copy = copy_of(bundle, tmp_path)
    b = load_bundle(copy)
    (copy / ONNX).write_bytes(b"not the checked graph")
    with pytest.raises(BundleError, match=rf"{ONNX} does not match.*re-export the bundle with "
                                          r"--onnx"):  # fmt: skip
        bundle_embedder(b, "onnx")


def test_graph_linked_outside_the_bundle_is_not_read(exported, tmp_path):
    _, bundle, _ = exported
    copy = copy_of(bundle, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(copy / ONNX, outside)
    (copy / ONNX).symlink_to(outside)
    with pytest.raises(BundleError, match="outside|symlink|resolves"):
        load_bundle(copy)


def test_failed_parity_leaves_no_bundle(exported, tmp_path, monkeypatch):
    root, _, _ = exported
    real = onnx_mod.OnnxSession.embed
    monkeypatch.setattr(onnx_mod.OnnxSession, "embed",
                        lambda self, x, from_prefix=False: -real(self, x))  # fmt: skip
    embedded = []
    monkeypatch.setattr("mltrain.inference.embedder.Embedder.embed",
                        lambda *a, **k: embedded.append(1))  # fmt: skip
    out = tmp_path / "bundle"
    with pytest.raises(MltrainError, match=r"ONNX export refused.*worst cosine -1\.0"):
        export_bundle(tiny_embedder(root, LITE0), out, "test", onnx=True)
    assert not embedded  # refused before the gallery was embedded
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a staging folder


def test_added_images_keep_the_graph(exported, tmp_path):
    root, bundle, _ = exported
    copy = copy_of(bundle, tmp_path)
    new = write_image_folder(tmp_path / "new", ["zebra"], 2, (32, 32))
    assert add_images(copy, new) == 2
    b = load_bundle(copy)  # every hash, model.onnx's included, checks out
    assert b.has_onnx and json.loads((copy / "manifest.json").read_text())["onnx"]
    got = bundle_embedder(b, "onnx").embed([new / "zebra" / "img_000.jpg"])
    np.testing.assert_allclose(got[0], b.embeddings[len(b) - 2], atol=1e-4)


def tiny_lite0(root: Path, tmp_path: Path) -> list[str]:
    """Command arguments for a random-weight lite0 at 32 px over `root`, a flat index."""
    sets = ["model.pretrained=false", "model.image_size=32", f"data.root={root}",
            "data.exclude_classes=[]", "data.num_workers=0", f"output_dir={tmp_path / 'exp'}",
            "export.index=flat"]  # fmt: skip
    return ["--backbone", "tf_efficientnet_lite0", *(a for s in sets for a in ("--set", s))]


def test_export_command_onnx_flag_then_search_with_it(tmp_path, capsys):
    from mltrain.commands import export as export_cmd

    root = write_image_folder(tmp_path / "data", 2, 3, (32, 32))
    out = tmp_path / "bundle"
    export_cmd.main([*tiny_lite0(root, tmp_path), "--set", "data.split=none", "--onnx",
                     "--out", str(out)])  # fmt: skip
    assert "exported 6 images" in capsys.readouterr().out
    assert load_bundle(out).has_onnx
    assert main([str(out), str(root / "class_1" / "img_001.png"), "--json",
                 "--backend", "onnx"]) == 0  # fmt: skip
    top = json.loads(capsys.readouterr().out)["queries"][0]["results"][0]
    # the gallery was embedded with bf16 autocast where the CPU has it, the query in fp32
    assert top["path"] == "class_1/img_001.png" and top["score"] == pytest.approx(1, abs=1e-3)


def test_evaluate_export_onnx_writes_the_graph(tmp_path, capsys):
    from mltrain.commands import evaluate

    root = write_image_folder(tmp_path / "data", 3, 6, (32, 32))
    out = tmp_path / "bundle"
    evaluate.main([*tiny_lite0(root, tmp_path), "--export", str(out), "--onnx"])
    b = load_bundle(out)
    assert b.has_onnx and b.manifest["onnx"]["worst_cosine"] >= 0.9999
    assert bundle_embedder(b, "onnx").embed([root / "class_0" / "img_000.jpg"]).shape[0] == 1


def test_evaluate_onnx_needs_export():
    from mltrain.commands import evaluate as evaluate_cmd
    from mltrain.errors import ConfigError

    with pytest.raises(ConfigError, match="--onnx needs --export"):
        evaluate_cmd.main(["--backbone", "tf_efficientnet_lite0", "--onnx"])


def test_sharded_bundle_carries_the_graph(exported, tmp_path):
    root, _, _ = exported
    out = export_bundle(tiny_embedder(root, LITE0), tmp_path / "sharded", "test", shard_size=5,
                        onnx=True)
    b = load_bundle(out)
    assert b.manifest["format_version"] == 2 and b.has_onnx
    paths = sorted(root.rglob("img_*"))
    np.testing.assert_allclose(bundle_embedder(b, "onnx").embed(paths), b.embeddings[:],
                               atol=1e-4)  # fmt: skip


def test_service_on_the_onnx_backend_answers_like_torch(exported):
    """How `mltrain serve --backend` plugs in: the service's embedder factory."""
    from mltrain.retrieval.service import SearchService

    root, bundle, _ = exported
    docs = {}
    for backend in ("torch", "onnx"):
        svc = SearchService(bundle, embedder_factory=lambda b, x=backend: bundle_embedder(b, x))
        try:
            assert svc.embedder.backend == backend
            docs[backend] = [svc.search(Path(q).read_bytes(), k=3, rerank="none",
                                        threshold="none")["results"]
                             for q in queries(root)]  # fmt: skip
        finally:
            svc.close()
    for t, o in zip(docs["torch"], docs["onnx"], strict=True):
        assert [h["path"] for h in t] == [h["path"] for h in o]
        np.testing.assert_allclose([h["score"] for h in o], [h["score"] for h in t], atol=1e-4)
