"""How inference batches meet the model on CPU: small chunks, and the model in the workers.

Two facts about small CPUs shape this (`benchmarks/embed.py` measures them; the README has
today's figures):

- A small batch's activations stay in cache, so a model call on a few images embeds each
  faster than one call on many. On CPU every batch is fed to the model in chunks of
  `eval.cpu_chunk` images.
- When loader workers decode JPEGs while the main process runs the model with one OpenMP
  thread per core, the two fight for the cores and each preempted OpenMP thread stalls its
  whole team. Letting every worker decode *and* embed its own batches with one thread each
  removes the contention.

Workers are forked with the model already in memory (copy-on-write, nothing pickled), which
is why this path needs Linux's fork and exactly one thread per worker: libgomp deadlocks in
a forked child that opens a parallel region.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mltrain.errors import MltrainError
from mltrain.progress import progress
from mltrain.runtime import InferSpec, autocast, usable_cpus, workers_can_run_model

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Fn = Callable[[torch.Tensor], torch.Tensor]


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.bfloat16:  # cached prefix features; autocast casts back as needed
        x = x.float()
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def apply(fn: Fn, x: torch.Tensor, spec: InferSpec) -> torch.Tensor:
    """`fn(x)` on the CPU copy, in `spec.cpu_chunk`-sized pieces on CPU."""
    x = to_device(x, spec.device, spec.channels_last)
    chunk = spec.cpu_chunk if spec.device.type == "cpu" and spec.cpu_chunk > 0 else len(x)
    chunk = max(chunk, 1)
    with autocast(spec.device, spec.amp):
        parts = [fn(x[s : s + chunk]).cpu() for s in range(0, len(x), chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _RunInWorker:
    """A collate function that also runs the model, so the worker returns outputs."""

    def __init__(self, fn: Fn, spec: InferSpec, collate: Callable) -> None:
        self.fn, self.spec, self.collate = fn, spec, collate

    def __call__(self, samples: list) -> Batch:
        # One thread: PyTorch's worker loop has already set it (more would deadlock, see above).
        x, y, idx = self.collate(samples)
        with torch.inference_mode():
            return apply(self.fn, x, self.spec), torch.as_tensor(y), torch.as_tensor(idx)


def batches(fn: Fn, loader: Iterable, spec: InferSpec) -> Iterator[Batch]:
    """(fn output on CPU, labels, indices) per batch of `loader`, in loader order."""
    if spec.in_workers and _can_move(loader, spec):
        yield from _in_workers(fn, loader, spec)
        return
    for x, y, idx in loader:
        yield apply(fn, x, spec), torch.as_tensor(y), torch.as_tensor(idx)


def _can_move(loader: Iterable, spec: InferSpec) -> bool:
    """Only on CPU, and only with a worker per core (up to 16): fewer single-threaded workers
    would leave cores idle that the main process's threads would use."""
    return (
        isinstance(loader, DataLoader)
        and spec.device.type == "cpu"
        and loader.num_workers >= min(usable_cpus(), 16)
        and workers_can_run_model()
    )


def _in_workers(fn: Fn, loader: DataLoader, spec: InferSpec) -> Iterator[Batch]:
    """The same batches, workers and seeds as `loader`, with the model run in the workers.

    A fresh, non-persistent loader is forked on every call, so the workers see the model's
    current weights (a persistent worker would keep the weights of its first epoch)."""
    moved = DataLoader(
        loader.dataset,
        batch_sampler=loader.batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=_RunInWorker(fn, spec, loader.collate_fn),
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        multiprocessing_context="fork",
    )
    yield from moved


@torch.inference_mode()
def iter_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, spec: InferSpec, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`fn` over each batch in loader order, yielded as computed: (output on CPU, labels,
    dataset indices). Nothing is kept, so a caller that writes batches out (shards) holds
    one batch at a time; `run_batches` is the collecting form. `spec` says where the model
    runs (see `InferSpec`)."""
    total = len(loader) if isinstance(loader, Sized) else None
    yield from progress(batches(fn, loader, spec), desc=desc, total=total)


@torch.inference_mode()
def run_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, spec: InferSpec, desc: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fn` over every batch in loader order: (outputs on CPU, labels, dataset indices)."""
    parts = list(iter_batches(fn, loader, spec, desc))
    if not parts:
        raise MltrainError("nothing to embed: the image list is empty")
    outs, labels, indices = zip(*parts, strict=True)
    return torch.cat(outs), torch.cat(labels), torch.cat(indices)


def _embed_fn(
    model: nn.Module, from_prefix: bool, flip: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The embedding of a batch; with `flip`, the mean of the image's and its mirror's
    (re-normalised when the model normalises). Cached prefix features are never flipped:
    a mirrored feature map is not the features of the mirrored image."""
    if not flip or from_prefix:
        return lambda x: model.embed(x, from_prefix=from_prefix).float()

    def both(x: torch.Tensor) -> torch.Tensor:
        return mirror_mean(model.embed(x), model.embed(x.flip(3)), model.normalize)

    return both


def mirror_mean(emb: torch.Tensor, mirror: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The flip average of an image's and its mirror's embeddings (re-normalised when the
    model normalises): what `eval.flip_tta` embeds."""
    out = emb.float() + mirror.float()
    return F.normalize(out, dim=1) if normalize else out / 2


def _checked(emb: torch.Tensor) -> np.ndarray:
    emb_np = emb.numpy().astype(np.float32, copy=False)
    if not np.isfinite(emb_np).all():
        raise MltrainError("embeddings contain NaN/inf; the checkpoint's weights are broken")
    return emb_np


def extract_embeddings(
    model: nn.Module,
    loader: Iterable,
    spec: InferSpec,
    from_prefix: bool = False,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings float32, labels, dataset indices) in loader order, with a progress bar."""
    model.eval()
    fn = _embed_fn(model, from_prefix, spec.flip)
    emb, labels, indices = run_batches(fn, loader, spec, desc)
    return _checked(emb), labels.numpy(), indices.numpy()


def stream_embeddings(
    model: nn.Module,
    loader: Iterable,
    spec: InferSpec,
    from_prefix: bool = False,
    desc: str = "embedding",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`extract_embeddings` one batch at a time: (embeddings float32, labels, dataset
    indices) per batch, for galleries written to disk as they come rather than held."""
    model.eval()
    fn = _embed_fn(model, from_prefix, spec.flip)
    for emb, labels, indices in iter_batches(fn, loader, spec, desc):
        yield _checked(emb), labels.numpy(), indices.numpy()


@torch.inference_mode()
def embed_tensor(model: nn.Module, x: torch.Tensor, spec: InferSpec) -> np.ndarray:
    """Embeddings (float32) of one ready batch `x`, as `extract_embeddings` computes a
    loader's: same chunks, precision and flip. For images already in memory (uploads)."""
    return _checked(apply(_embed_fn(model, False, spec.flip), x, spec))
