"""Embedding an image list with a pool of Ray actors, on one machine or a Ray cluster.

`ray_embedder` connects to Ray (or starts a small local Ray) and yields a `RayEmbedder`: an
`Embedder` whose `embed` and `embed_batches` send the paths, in blocks of one batch, to a
pool of actors (`ray.util.ActorPool`, results in path order, checked as they arrive).
Everything else an export or an add does (shards, metadata, manifest, index) runs in this
process on the streamed result, so a bundle written this way has the layout and, row for
row, the embeddings of a single-process one.

Each actor rebuilds the model once from the weights this process sends through the object
store (nothing is downloaded on the workers), then decodes and embeds whole batches with the
same dataset, transform, chunks and precision as `Embedder.embed`, on the runner that this
process's `Embedder` would take for the whole job (OpenVINO's graph traced here, once). On a
cluster every node needs the same mltrain installed and the images at the same absolute
paths (a shared file system).

The pool's actors are plain Ray actors rather than Ray Data's `map_batches` pool, whose
actors start only once its dataset runs: an actor's start (a process importing torch and
timm, 4-6 s on 2 cores) then waits for the whole model build. These can start with Ray
itself (`mltrain.inference.ray_start.ray_started_early`), beside the command's imports.
Failures are one line: Ray missing, an unreachable address, an unreadable image (the actor
returns the loader's message rather than crash, so it names the file as a plain export does),
or an actor that died (the last line of its error and where Ray keeps its logs).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mltrain.errors import ConfigError, DataError, MltrainError
from mltrain.inference.embedder import PROBE_IMAGES, Embedder
from mltrain.inference.ray_start import (
    RayOptions,
    early_actors,
    kill,
    last_line,
    pool_shape,
    ray_resources,
    ray_runtime,
    start_pool,
)
from mltrain.progress import progress

MAX_BLOCKS = 2000  # blocks of a job: a gallery of millions gets blocks of several batches


@dataclass
class RayEmbedder(Embedder):
    """An `Embedder` that embeds path lists on Ray actors (see the module docstring). Made
    by `ray_embedder`, valid while its Ray connection is."""

    options: RayOptions = field(default_factory=RayOptions)
    weights: Any = field(default=None, repr=False)  # object ref of the model's state dict
    actors: list[Any] = field(default_factory=list, init=False, repr=False)
    loaded: tuple[int, int, str] | None = field(default=None, init=False, repr=False)

    def embed(
        self, paths: list[Path], labels: np.ndarray | None = None, desc: str = "embedding"
    ) -> np.ndarray:
        parts = list(self.embed_batches(paths, labels, desc))
        if not parts:
            raise DataError("nothing to embed: the image list is empty")
        return np.concatenate(parts)

    def embed_batches(
        self, paths: list[Path], labels: np.ndarray | None = None, desc: str = "embedding"
    ) -> Iterator[np.ndarray]:
        """Embeddings (float32) in `paths` order, one block at a time."""
        import ray
        from ray.util import ActorPool

        if not paths:
            return
        blocks = _blocks(paths, self.cfg.eval.batch_size)
        expected = 0
        try:
            pool = ActorPool(self._pool(len(paths), len(blocks)))
            done = pool.map(lambda actor, block: actor.embed.remote(block), blocks)
            for out in progress(done, desc=desc, total=len(blocks)):
                expected = _checked_rows(out, expected)
                yield np.asarray(out["embedding"], dtype=np.float32)
        except ray.exceptions.RayError as e:
            self.close()  # an actor may still be busy with the blocks after the failed one
            raise MltrainError(
                f"a Ray embedding actor failed ({last_line(e)}); see the worker logs "
                "under /tmp/ray/session_latest/logs on its node"
            ) from None
        if expected != len(paths):
            raise MltrainError(f"Ray returned {expected} of {len(paths)} embeddings")

    def _pool(self, n: int, blocks: int) -> list[Any]:
        """The pool's actors for a job of `n` images in `blocks` blocks, each with the model
        loaded on the runner a single process would take for the whole job (torch on
        actors' GPUs); started (or taken from `ray_started_early`) and loaded the first
        time, and again only for a job of another shape."""
        import ray

        actors, threads = self.shape(blocks)
        batch, gpus = self.cfg.eval.batch_size, self.gpus_per_actor
        runner = "torch" if gpus else self.runner_for(n, min(n, batch))
        if self.loaded == (actors, threads, runner):
            return self.actors
        self.close()
        self.actors = early_actors(actors, threads, gpus)
        self.actors += start_pool(ray, actors - len(self.actors), threads, gpus)
        load = {"cfg": self.cfg, "num_classes": _num_classes(self), "weights": self.weights,
                "threads": threads, "device": "cuda" if gpus else "cpu", "runner": runner,
                "graph": self._graph(runner)}  # fmt: skip
        ray.get([actor.load.remote(_EmbedActor, **load) for actor in self.actors])
        self.loaded = (actors, threads, runner)
        return self.actors

    def close(self) -> None:
        """Stop the pool's actors (a local Ray's shutdown would too; a cluster's would not)."""
        kill(self.actors)
        self.actors, self.loaded = [], None

    def _graph(self, runner: str) -> Any:
        """For OpenVINO, the model's ONNX graph in the object store: the bundle's, else one
        traced in this process rather than in every actor (a trace costs seconds of CPU on
        a busy machine). None where the tracer cannot run: the actors then convert it."""
        import ray

        if runner != "openvino":
            return None
        graph = self.graph or _trace(self)
        return None if graph is None else ray.put(graph)

    @property
    def gpus_per_actor(self) -> float:
        if self.options.gpus is not None:
            return float(self.options.gpus)
        return 1.0 if self.device.type == "cuda" else 0.0

    def shape(self, blocks: int | None = None) -> tuple[int, int]:
        """(actors, CPU threads per actor) for a job of `blocks` batches (None: the largest
        pool), by `mltrain.inference.ray_start.pool_shape` on this Ray's resources."""
        import ray

        cpus, gpus_there = ray_resources(ray)
        return pool_shape(self.options, cpus, gpus_there, self.gpus_per_actor, blocks)


def _blocks(paths: list[Path], batch: int) -> list[dict[str, np.ndarray]]:
    """(row, absolute path) blocks of whole batches, at most `MAX_BLOCKS` of them."""
    n = len(paths)
    rows = batch * max(1, math.ceil(n / (batch * MAX_BLOCKS)))
    names = np.array([str(Path(p).absolute()) for p in paths])
    return [{"row": np.arange(s, min(s + rows, n), dtype=np.int64), "path": names[s:s + rows]}
            for s in range(0, n, rows)]  # fmt: skip


def _num_classes(embedder: Embedder) -> int:
    head = embedder.model.head
    return int(head.out_features) if head is not None else 0


def _checked_rows(out: dict[str, np.ndarray], expected: int) -> int:
    """Raise the image error an actor returned; check the rows are the next ones in order.
    Returns the next row expected."""
    errors = [str(e) for e in out["error"] if str(e)]
    if errors:
        raise DataError(errors[0])
    rows = np.asarray(out["row"])
    if not np.array_equal(rows, np.arange(expected, expected + len(rows))):
        raise MltrainError(f"Ray returned rows out of order (expected row {expected}, got "
                           f"{rows[0] if len(rows) else 'none'})")  # fmt: skip
    return expected + len(rows)


class _EmbedActor:
    """What one actor of the pool runs (`ray_start.PoolWorker`): builds the model once, then
    embeds one block of paths a call, as `Embedder.embed` would (same dataset, transform,
    chunks, precision and flip).

    Its `threads` decode a batch together, then run the model: OpenVINO as one stream each;
    torch on the CPU as one single-threaded model call each on its share of the batch's
    chunks, the way the single-process export runs one single-threaded worker per core
    (a team of OpenMP threads stalls whenever another process preempts one of them: on a
    loaded 2-core machine 2 OpenMP threads embedded 15-40 img/s, one thread 90-120)."""

    def __init__(self, cfg: Any, num_classes: int, weights: Any, threads: int, device: str,
                 runner: str = "torch", graph: Any = None) -> None:  # fmt: skip
        import ray

        from mltrain.data.pipeline import decode_size
        from mltrain.data.transforms import eval_transform
        from mltrain.inference.embedder import make_embedder
        from mltrain.model.network import model_from_state

        torch.set_num_threads(threads)  # OpenVINO's streams follow it
        cfg = copy.deepcopy(cfg)
        cfg.train.device = device
        # `runner`: the one `eval.backend` takes for the whole job in the exporting process
        # (`Embedder.runner_for`; under auto, OpenVINO from about 1,000 images), built now,
        # once, from its `graph`; an OpenVINO runner lives until the actor's process exits.
        cfg.eval.backend = runner
        state, graph = (ray.get(x) if isinstance(x, ray.ObjectRef) else x
                        for x in (weights, graph))  # fmt: skip
        model = model_from_state(cfg.model, num_classes, state, "the model sent to Ray")
        embedder = replace(make_embedder(cfg, model), graph=graph)
        self.embedder = embedder.for_job(1, 1)  # the runner named: no choice left to make
        self.model = self.embedder.forward_model  # BatchNorm folded now, not in two threads
        self.spec = self.embedder.spec
        self.transform = eval_transform(self.embedder.dcfg)
        self.size = decode_size(self.embedder.dcfg)
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.shares = 1
        if self.pool is not None and self.embedder.backend == "torch" and device == "cpu":
            torch.set_num_threads(1)
            self.shares = threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, dim = len(batch["row"]), self.embedder.embedding_dim
        try:
            emb, error = self._embed(self._tensors([str(p) for p in batch["path"]])), ""
        except MltrainError as e:  # an unreadable image: the driver raises it, named
            emb, error = np.zeros((n, dim), np.float32), str(e)
        return {"row": batch["row"], "embedding": emb, "error": np.array([error] * n)}

    def _tensors(self, paths: list[str]) -> torch.Tensor:
        from mltrain.data.dataset import ImageDataset

        ds = ImageDataset(paths, np.zeros(len(paths), np.int64), self.transform, self.size)
        items = (self.pool.map if self.pool else map)(ds.__getitem__, range(len(ds)))
        return torch.stack([x for x, _, _ in items])

    def _embed(self, x: torch.Tensor) -> np.ndarray:
        """The batch's embeddings, its whole chunks shared among `shares` threads."""
        chunk = max(self.spec.cpu_chunk, 1)
        step = chunk * math.ceil(len(x) / (chunk * self.shares))
        if self.pool is None or len(x) <= step:
            return self._one(x)
        return np.concatenate(list(self.pool.map(self._one, torch.split(x, step))))

    def _one(self, x: torch.Tensor) -> np.ndarray:
        from mltrain.inference.batching import embed_tensor

        return embed_tensor(self.model, x, self.spec)


def _trace(embedder: Embedder) -> bytes | None:
    """The model's ONNX graph for OpenVINO, traced on `Embedder`'s probe; None where the
    tracer cannot run."""
    from mltrain.inference.onnx import export_bytes, noise_probe

    try:
        return export_bytes(embedder.model, noise_probe(tuple(embedder.dcfg["input_size"]),
                                                        PROBE_IMAGES))  # fmt: skip
    except MltrainError:
        return None


@contextlib.contextmanager
def ray_embedder(embedder: Embedder, options: RayOptions) -> Iterator[RayEmbedder]:
    """`embedder` running on Ray for the body (see the module docstring): Ray is joined or
    started first, so a wrong address or a missing Ray is said before anything is written."""
    if type(embedder) is not Embedder:
        raise ConfigError(f"--ray embeds with one model; a {type(embedder).__name__} cannot")
    with ray_runtime(options.address) as ray:
        state = {k: v.detach().cpu() for k, v in embedder.model.state_dict().items()}
        own = {f.name: getattr(embedder, f.name) for f in fields(Embedder) if f.init}
        pool = RayEmbedder(**own, options=options, weights=ray.put(state))
        pool.shape()  # a pool this Ray cannot hold is refused now
        if pool.gpus_per_actor == 0 and embedder.device.type == "cuda":
            print("note: --ray-gpus 0: the actors embed on CPU", file=sys.stderr)
        try:
            yield pool
        finally:
            pool.close()


def on_ray(embedder: Embedder, options: RayOptions | None) -> contextlib.AbstractContextManager:
    """`ray_embedder(embedder, options)`, or `embedder` itself when `options` is None: the one
    line a caller needs to embed either way."""
    return contextlib.nullcontext(embedder) if options is None else ray_embedder(embedder, options)
