"""The model inside a bundle: rebuilt from its model.pt and its manifest's config, and run by
the backend a job chooses (`choose_backend`: torch, onnxruntime on model.onnx, or OpenVINO).
`load_bundle` (`mltrain.retrieval.bundle`) has checked every file before any of this runs."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import torch

from mltrain.errors import BundleError, CheckpointError, ConfigError
from mltrain.inference.backends import fastest
from mltrain.inference.embedder import BACKENDS as RUNNERS
from mltrain.inference.embedder import Embedder, make_embedder
from mltrain.model.network import model_from_state
from mltrain.retrieval.bundle import (
    MANIFEST,
    MODEL,
    ONNX,
    REEXPORT,
    REEXPORT_ONNX,
    Bundle,
    bundle_config,
    bundle_file,
)

BACKENDS = ("auto", *RUNNERS)  # what --backend takes: a runner, or auto to choose one

# Whether `auto` runs model.onnx for queries. Measured on the quiet 2-core AVX512-BF16
# machine (README "Performance (CPU)", benchmarks/onnx_batches.py): onnxruntime fp32 against
# torch (bf16 autocast, BatchNorm folded) embeds 4.1-4.3x as fast at batch 1, 2.3-2.4x at 2,
# 1.5x at 4, 0.93-1.18x at 8-16; one in-process search takes 5.6 against 17.1 ms, the server
# with one client 11.8 against 16.9 ms (p50), with eight clients level. Queries come alone or
# in micro-batches of a few: ONNX, where `mltrain.inference.backends.COSTS` agrees.
AUTO_PREFERS_ONNX = True


def choose_backend(bundle: Bundle, backend: str = "auto", images: int = 1,
                   per_call: int | None = None) -> str:  # fmt: skip
    """The runner for `backend` ("auto" or a runner) on a job of `images` images, `per_call`
    per model call (default: all at once).

    `auto` takes the runner with the least measured time for the job
    (`mltrain.inference.backends.fastest`) among torch, onnxruntime (where the bundle has
    model.onnx, onnxruntime is installed and `AUTO_PREFERS_ONNX`) and OpenVINO (where
    installed; without model.onnx it traces the model first, which the estimate counts).
    Asking for onnx without model.onnx is an error that says how to get one.
    """
    from mltrain.inference.onnx import onnxruntime_available
    from mltrain.inference.openvino import openvino_available, require_openvino

    if backend not in BACKENDS:
        raise BundleError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        runners = ["torch"]
        if AUTO_PREFERS_ONNX and bundle.has_onnx and onnxruntime_available():
            runners.append("onnx")
        if openvino_available():
            runners.append("openvino")
        calls = per_call or images
        return fastest(runners, images, calls, traced=not bundle.has_onnx)
    if backend == "onnx" and not bundle.has_onnx:
        raise BundleError(f"{bundle.path} has no {ONNX} for --backend onnx; {REEXPORT_ONNX}")
    if backend == "openvino":
        require_openvino()
    return backend


def bundle_embedder(bundle: Bundle, backend: str = "auto", images: int = 1,
                    per_call: int | None = None) -> Embedder:  # fmt: skip
    """The bundle's model, rebuilt from its config with its own weights (no download), run
    by `backend` for a job of `images` images (see `choose_backend`; the defaults suit a
    query). OpenVINO compiles model.onnx where the bundle has one (else a trace of the
    model), and is checked against PyTorch first: refused, torch embeds after a note line.

    model.pt is read first and compared, key by key and shape by shape, with the config's
    model built on the meta device: a manifest naming a huge backbone is refused before
    that backbone is allocated. The onnx backend also builds the PyTorch model (its
    preprocessing and sizes come from it) and runs model.onnx, whose bytes are checked
    against the manifest as they are handed to onnxruntime.
    """
    chosen = choose_backend(bundle, backend, images, per_call)
    embedder = _torch_embedder(bundle)
    if chosen == "torch":
        return embedder
    if chosen == "openvino":
        graph = _onnx_graph(bundle) if bundle.has_onnx else None
        on_openvino = replace(embedder, backend="openvino", graph=graph)
        return on_openvino.for_job(images, per_call or images)
    if bundle._onnx_embedder is None:
        from mltrain.inference.onnx import OnnxSession

        session = OnnxSession(_onnx_graph(bundle), embedder.model.normalize)
        bundle._onnx_embedder = embedder.with_backend("onnx", session)
    return bundle._onnx_embedder


def _onnx_graph(bundle: Bundle) -> bytes:
    """model.onnx's bytes, refused unless they are the ones the manifest hashed."""
    path = bundle_file(bundle.path, ONNX)
    graph = path.read_bytes()
    if hashlib.sha256(graph).hexdigest() != bundle.manifest["files"].get(ONNX):
        raise BundleError(f"{path} does not match its sha256 in {MANIFEST} (changed, replaced "
                          f"or from another export); {REEXPORT_ONNX}")  # fmt: skip
    return graph


def _torch_embedder(bundle: Bundle) -> Embedder:
    if bundle._embedder is not None:
        return bundle._embedder
    cfg = bundle_config(bundle)
    mpath = bundle.path / MODEL
    try:
        state = torch.load(mpath, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise BundleError(
            f"{mpath} is not a loadable tensor state_dict ({type(e).__name__}); {REEXPORT}"
        ) from None
    if not isinstance(state, dict):
        raise BundleError(f"{mpath} holds no state_dict; {REEXPORT}")
    num_classes = bundle.manifest.get("num_classes", 0)
    if type(num_classes) is not int or num_classes < 0:
        raise BundleError(f"{bundle.path / MANIFEST}: num_classes {num_classes!r} is not a "
                          f"count; {REEXPORT}")  # fmt: skip
    try:
        model = model_from_state(cfg.model, num_classes, state, str(mpath),
                                 described_by="the manifest's config")  # fmt: skip
    except CheckpointError as e:
        raise BundleError(f"{e}; {REEXPORT}") from None
    except ConfigError as e:  # a stored config this version refuses: about the bundle
        raise BundleError(f"{bundle.path / MANIFEST}: the manifest's config does not build a "
                          f"model ({e}); {REEXPORT}") from None
    cfg.eval.backend = "torch"  # the runner is `bundle_embedder`'s choice
    bundle._embedder = make_embedder(cfg, model)
    bundle._embedder._on["torch"] = bundle._embedder  # a refused runner falls back to this one
    return bundle._embedder
