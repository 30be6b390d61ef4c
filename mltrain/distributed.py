"""Multi-process training with DistributedDataParallel, launched by `torchrun`.

Every rank takes a contiguous slice of each *global* batch, so a balanced batch (m images of
each of its classes) stays balanced per rank when (batch_size / world) is a multiple of m.
Embeddings are all-gathered with autograd and every rank computes the loss on the whole global
batch: DDP's gradient average then equals the single-process gradient of that batch (only
BatchNorm statistics, computed per rank, differ).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from mltrain.errors import ConfigError


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def init(device: torch.device) -> None:
    """Join the process group when launched by torchrun: gloo on CPU, NCCL on GPUs."""
    rank, size = world()
    if size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=size)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. filling a disk cache), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def local_batch_size(batch_size: int, sampler_m: int | None) -> int:
    """Per-rank share of the global batch; balanced batches need whole classes per rank."""
    _, size = world()
    if batch_size % size:
        raise ConfigError(f"train.batch_size {batch_size} must be divisible by {size} processes")
    local = batch_size // size
    if sampler_m and local % sampler_m:
        raise ConfigError(
            f"train.batch_size {batch_size} over {size} processes gives {local} per process, "
            f"not a multiple of the sampler's m={sampler_m}; raise batch_size"
        )
    return local


class RankSliceSampler(Sampler[int]):
    """Yields this rank's slice of every global batch of a base order (same on all ranks).

    Not to be confused with embedding shards (`mltrain.retrieval.shards`): this slices
    batches between processes."""

    def __init__(self, base: Sampler[int] | None, n: int, batch_size: int, seed: int) -> None:
        self.base, self.n, self.batch, self.seed = base, n, batch_size, seed
        self.rank, self.size = world()

    def _order(self) -> list[int]:
        if self.base is not None:
            return list(iter(self.base))
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order, local = self._order(), self.batch // self.size
        for start in range(0, len(order) - self.batch + 1, self.batch):
            offset = start + self.rank * local
            yield from order[offset : offset + local]

    def __len__(self) -> int:
        n = len(self.base) if self.base is not None else self.n
        return (n // self.batch) * (self.batch // self.size)


def gather(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch on every rank; gradients flow back to each rank's own slice."""
    if not dist.is_initialized():
        return emb, labels
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        all_emb = torch.cat(all_gather(emb), dim=0)
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels)
    return all_emb, torch.cat(all_labels, dim=0)


def mean(value: float) -> float:
    """Average a scalar over ranks (for logging)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def broadcast_object(value):
    """Rank 0's `value` (a string, number or None) on every rank: one decision for all."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_path(path):
    """Rank 0's value (e.g. the new run folder) on every rank."""
    if not dist.is_initialized():
        return path
    from pathlib import Path

    return Path(broadcast_object(str(path) if path is not None else None))
