"""Rebuild an embedding model from a checkpoint alone, and embed image lists with it."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mltrain.config import Config
from mltrain.data.pipeline import eval_loader
from mltrain.data.transforms import eval_transform
from mltrain.errors import CheckpointError, ConfigError, DataError, MltrainError
from mltrain.inference.backends import RUNNERS, check_backend, fastest
from mltrain.inference.batching import embed_tensor, extract_embeddings, stream_embeddings
from mltrain.inference.onnx import OnnxSession, noise_probe
from mltrain.inference.openvino import (
    OpenVinoModel,
    OpenVinoUnavailable,
    checked_runner,
    openvino_available,
    require_openvino,
)
from mltrain.model.checkpoint import Checkpoint, open_checkpoint
from mltrain.model.fusion import fold_batchnorm
from mltrain.model.network import EmbeddingModel, build_model, data_config, model_from_state
from mltrain.runtime import InferSpec, Runtime, infer_spec

BACKENDS = RUNNERS  # what can run the model; an Embedder may also be "auto" until it embeds
PROBE_IMAGES = 4  # noise images on which a runner must reproduce PyTorch fp32


@dataclass
class Embedder:
    """A model ready for inference: its config, preprocessing and device settings."""

    cfg: Config
    model: EmbeddingModel
    dcfg: dict[str, Any]
    device: torch.device
    amp: torch.dtype | None
    _fast: EmbeddingModel | None = field(default=None, repr=False)
    _transform: Any = field(default=None, repr=False)  # eval_transform(dcfg), built once
    # Optimizer steps the weights were trained for (0: untrained): evaluations of a
    # checkpoint are logged at this step, on the axis of its training curves.
    global_step: int = 0
    # What runs the model: "torch", "onnx" (`onnx` holds the onnxruntime session of the
    # exported graph; see `mltrain.inference.onnx`), "openvino" (`openvino`, compiled when
    # first used; see `mltrain.inference.openvino`), or "auto": each embedding call runs on
    # `for_job`'s choice. Every embedding path goes through `forward_model` and `spec`.
    backend: str = "torch"
    onnx: OnnxSession | None = field(default=None, repr=False)
    openvino: OpenVinoModel | None = field(default=None, repr=False)
    graph: bytes | None = field(default=None, repr=False)  # ONNX graph of `model` (model.onnx)
    # The embedders `for_job` returned, by runner, shared by every copy: built once.
    _on: dict[str, Embedder] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if self.backend == "onnx" and self.onnx is None:
            raise ConfigError("backend onnx needs the ONNX session of an exported model")
        if self.backend == "openvino":
            require_openvino()

    def with_backend(self, backend: str, onnx: OnnxSession | None = None) -> Embedder:
        """This embedder on another backend, sharing the model (and its folded copy)."""
        return replace(self, backend=backend, onnx=onnx if onnx is not None else self.onnx)

    def for_job(self, images: int, per_call: int) -> Embedder:
        """The embedder that runs a job of `images` images, `per_call` per model call: this
        one, or under auto the runner with the least measured time for the job
        (`mltrain.inference.backends.fastest`) among those that can run here. OpenVINO is
        compiled and checked against PyTorch on first use; when it is refused, torch embeds
        instead, after one note line."""
        if self.backend in ("torch", "onnx") or self.openvino is not None:
            return self
        choice = self.runner_for(images, per_call)
        return self._on_openvino() if choice == "openvino" else self._on_runner(choice)

    def runner_for(self, images: int, per_call: int) -> str:
        """The runner `for_job` takes for such a job, named without building it (a Ray
        export traces the graph for OpenVINO once, for every actor)."""
        if self.backend in ("torch", "onnx") or self.openvino is not None:
            return self.backend
        if self.backend == "openvino":
            return "openvino"
        if self.device.type != "cpu":  # the other runners are CPU-only here
            return "torch"
        runners = ["torch", *(["onnx"] if self.onnx is not None else []),
                   *(["openvino"] if openvino_available() else [])]  # fmt: skip
        ready = {*self._on, *(["torch"] if self._fast is not None else [])}
        return fastest(runners, images, per_call, traced=self.graph is None, ready=ready)

    def _on_runner(self, runner: str) -> Embedder:
        if runner not in self._on:
            self._on[runner] = replace(self, backend=runner)
        return self._on[runner]

    def _on_openvino(self) -> Embedder:
        if "openvino" not in self._on:
            try:
                probe = noise_probe(tuple(self.dcfg["input_size"]), PROBE_IMAGES)
                runner, _ = checked_runner(self.model, probe, self.graph)
                self._on["openvino"] = replace(self, backend="openvino", openvino=runner)
            except MltrainError as e:
                if isinstance(e, OpenVinoUnavailable) and self.backend == "openvino":
                    raise
                print(f"note: {e}; embedding with torch instead", file=sys.stderr)
                self._on["openvino"] = self._on_runner("torch")
        return self._on["openvino"]

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    @property
    def forward_model(self) -> EmbeddingModel | OnnxSession | OpenVinoModel:
        """The model that embeds: with `eval.fold_bn`, a copy with BatchNorm folded into the
        convolutions (same embeddings, fewer passes over memory); with the onnx backend, the
        onnxruntime session; with openvino, the compiled model. `model` stays as trained,
        for export."""
        if self.backend == "onnx":
            return self.onnx
        if self.backend == "openvino" and self.openvino is not None:
            return self.openvino
        if not self.cfg.eval.fold_bn:
            return self.model
        if self._fast is None:
            probe = torch.randn(2, *self.dcfg["input_size"], device=self.device)
            self._fast = fold_batchnorm(self.model, probe)
            if self.cfg.train.channels_last:
                self._fast.to(memory_format=torch.channels_last)
        return self._fast

    @property
    def spec(self) -> InferSpec:
        """Where the model runs for this config and device (see `mltrain.inference.batching`).
        The ONNX graph is fp32 on CPU: no autocast, and plain (NCHW) input tensors. OpenVINO
        sets its own precision and chunks each batch over its requests itself, in this
        process: loader workers only decode."""
        spec = infer_spec(self.cfg, self.device, self.amp)
        if self.backend == "onnx":
            spec = replace(spec, device=torch.device("cpu"), amp=None, channels_last=False)
        if self.backend == "openvino" and self.openvino is not None:
            spec = replace(spec, device=torch.device("cpu"), amp=None, channels_last=False,
                           cpu_chunk=0, in_workers=False)  # fmt: skip
        return spec

    def _loader(self, paths: list[Path], labels: np.ndarray | None):
        labels = np.zeros(len(paths), dtype=np.int64) if labels is None else labels
        return eval_loader(self.cfg, paths, labels, self.dcfg)

    def _bulk(self, images: int) -> Embedder:
        return self.for_job(images, min(images, self.cfg.eval.batch_size))

    def embed(self, paths: list[Path], labels: np.ndarray | None = None, desc: str = "embedding"):
        runner = self._bulk(len(paths))
        model, loader = runner.forward_model, runner._loader(paths, labels)
        emb, _, _ = extract_embeddings(model, loader, runner.spec, desc=desc)
        return emb

    def embed_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        """Embeddings (float32, in order) of decoded RGB uint8 images already in memory, e.g.
        uploads: the same eval transform, `forward_model` and `spec` as `embed`, so a file
        and its bytes embed alike (decode them with `decode_image_bytes`)."""
        if not images:
            raise DataError("nothing to embed: the image list is empty")
        runner = self.for_job(len(images), len(images))
        if runner._transform is None:
            runner._transform = eval_transform(runner.dcfg)
        x = torch.stack([runner._transform(image) for image in images])
        return embed_tensor(runner.forward_model, x, runner.spec)

    def embed_batches(
        self, paths: list[Path], labels: np.ndarray | None = None, desc: str = "embedding"
    ) -> Iterator[np.ndarray]:
        """`embed` one batch at a time (float32, in `paths` order), so a gallery larger than
        memory can be written out as it is embedded (see `mltrain.retrieval.shards.ShardWriter`)."""
        runner = self._bulk(len(paths))
        model, loader = runner.forward_model, runner._loader(paths, labels)
        for emb, _, _ in stream_embeddings(model, loader, runner.spec, desc=desc):
            yield emb


def make_embedder(cfg: Config, model: EmbeddingModel) -> Embedder:
    runtime = Runtime.from_config(cfg)
    device = runtime.device
    model.to(device).eval()
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    dcfg = data_config(model, cfg.model)
    return Embedder(cfg, model, dcfg, device, runtime.infer_amp, backend=cfg.eval.backend)


def embedder_from_checkpoint(
    path: str | Path | Checkpoint, overrides: list[str] | None = None, cfg: Config | None = None
) -> Embedder:
    """The checkpoint's own config (`overrides` on top) rebuilds the model, or `cfg` where the
    caller has worked it out from this checkpoint already; its weights need no download. A
    run folder means its best.pt; a `Checkpoint` (`open_checkpoint`) is not read again."""
    ck = path if isinstance(path, Checkpoint) else open_checkpoint(path, prefer="best.pt")
    cfg = cfg if cfg is not None else ck.config(overrides)
    ckpt = ck.data
    num_classes = len(ckpt.get("train_classes") or [])
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{ck.given}: 'model' holds no state dict")
    model = model_from_state(cfg.model, num_classes, ckpt["model"], ck.given)
    embedder = make_embedder(cfg, model)
    embedder.global_step = int((ckpt.get("state") or {}).get("step", 0))
    return embedder


def embedder_from_backbone(cfg: Config) -> Embedder:
    """A pretrained backbone with no training: for comparing backbones before tuning. Its
    config's frozen stages mean nothing here, and another family may have fewer stages."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.head = False
    model_cfg.frozen_stages, model_cfg.trainable_stages = 0, None
    return make_embedder(cfg, build_model(model_cfg))
