"""Rebuild an embedding model from a checkpoint alone, and embed image lists with it."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mltrain.config import Config
from mltrain.data.pipeline import eval_loader
from mltrain.data.transforms import eval_transform
from mltrain.errors import CheckpointError, ConfigError, DataError
from mltrain.inference.batching import embed_tensor, extract_embeddings, stream_embeddings
from mltrain.inference.onnx import OnnxSession
from mltrain.model.checkpoint import checkpoint_config, load_checkpoint
from mltrain.model.fusion import fold_batchnorm
from mltrain.model.network import EmbeddingModel, build_model, data_config, model_from_state
from mltrain.runtime import InferSpec, Runtime, infer_spec

BACKENDS = ("torch", "onnx")


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
    # What runs the model: "torch", or "onnx" (`onnx` holds the onnxruntime session of the
    # exported graph; see `mltrain.inference.onnx`). Every embedding path goes through
    # `forward_model` and `spec`, so they all follow this.
    backend: str = "torch"
    onnx: OnnxSession | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.backend == "onnx" and self.onnx is None:
            raise ConfigError("backend onnx needs the ONNX session of an exported model")

    def with_backend(self, backend: str, onnx: OnnxSession | None = None) -> Embedder:
        """This embedder on another backend, sharing the model (and its folded copy)."""
        return replace(self, backend=backend, onnx=onnx if onnx is not None else self.onnx)

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    @property
    def forward_model(self) -> EmbeddingModel | OnnxSession:
        """The model that embeds: with `eval.fold_bn`, a copy with BatchNorm folded into the
        convolutions (same embeddings, fewer passes over memory); with the onnx backend, the
        onnxruntime session. `model` stays as trained, for export."""
        if self.backend == "onnx":
            return self.onnx
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
        The ONNX graph is fp32 on CPU: no autocast, and plain (NCHW) input tensors."""
        spec = infer_spec(self.cfg, self.device, self.amp)
        if self.backend == "onnx":
            spec = replace(spec, device=torch.device("cpu"), amp=None, channels_last=False)
        return spec

    def _loader(self, paths: list[Path], labels: np.ndarray | None):
        labels = np.zeros(len(paths), dtype=np.int64) if labels is None else labels
        return eval_loader(self.cfg, paths, labels, self.dcfg)

    def embed(self, paths: list[Path], labels: np.ndarray | None = None, desc: str = "embedding"):
        model, loader = self.forward_model, self._loader(paths, labels)
        emb, _, _ = extract_embeddings(model, loader, self.spec, desc=desc)
        return emb

    def embed_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        """Embeddings (float32, in order) of decoded RGB uint8 images already in memory, e.g.
        uploads: the same eval transform, `forward_model` and `spec` as `embed`, so a file
        and its bytes embed alike (decode them with `decode_image_bytes`)."""
        if not images:
            raise DataError("nothing to embed: the image list is empty")
        if self._transform is None:
            self._transform = eval_transform(self.dcfg)
        x = torch.stack([self._transform(image) for image in images])
        return embed_tensor(self.forward_model, x, self.spec)

    def embed_batches(
        self, paths: list[Path], labels: np.ndarray | None = None, desc: str = "embedding"
    ) -> Iterator[np.ndarray]:
        """`embed` one batch at a time (float32, in `paths` order), so a gallery larger than
        memory can be written out as it is embedded (see `mltrain.retrieval.shards.ShardWriter`)."""
        model, loader = self.forward_model, self._loader(paths, labels)
        for emb, _, _ in stream_embeddings(model, loader, self.spec, desc=desc):
            yield emb


def make_embedder(cfg: Config, model: EmbeddingModel) -> Embedder:
    runtime = Runtime.from_config(cfg)
    device = runtime.device
    model.to(device).eval()
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    dcfg = data_config(model, cfg.model)
    return Embedder(cfg, model, dcfg, device, runtime.infer_amp)


def embedder_from_checkpoint(path: str | Path, overrides: list[str] | None = None) -> Embedder:
    """The checkpoint's own config rebuilds the model; its weights need no download. A run
    folder means its best.pt."""
    ckpt = load_checkpoint(path, prefer="best.pt")
    cfg = checkpoint_config(ckpt, overrides, f"config stored in checkpoint {path}",
                            elsewhere=True)
    num_classes = len(ckpt.get("train_classes") or [])
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'model' holds no state dict")
    model = model_from_state(cfg.model, num_classes, ckpt["model"], str(path))
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
