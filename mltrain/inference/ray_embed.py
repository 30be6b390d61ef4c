"""Embedding an image list with a pool of Ray actors, on one machine or a Ray cluster.

`ray_embedder` connects to Ray (or starts a small local Ray) and yields a `RayEmbedder`: an
`Embedder` whose `embed` and `embed_batches` send the paths through a Ray dataset to a pool
of actors. Everything else an export or an add does (shards, metadata, manifest, index) runs
in this process on the streamed result, so a bundle written this way has the layout and,
row for row, the embeddings of a single-process one.

Each actor rebuilds the model once from the weights this process sends through the object
store (nothing is downloaded on the workers), then decodes and embeds whole batches with the
same dataset, transform, chunks and precision as `Embedder.embed`, on the runner that this
process's `Embedder` would take for the whole job (OpenVINO's graph traced here, once). Rows
come back in path order (Ray Data's `preserve_order`), checked as they arrive. On a cluster
every node needs the same mltrain installed and the images at the same absolute paths (a
shared file system).

Starting Ray and the pool flags are `mltrain.inference.ray_start`'s (it imports no torch).
Failures are one line: Ray missing, an unreachable address, an unreadable image (the actor
returns the loader's message rather than crash, so it names the file as a plain export does),
or an actor that died (the last line of its error and where Ray keeps its logs).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mltrain.errors import ConfigError, DataError, MltrainError
from mltrain.inference.embedder import PROBE_IMAGES, Embedder
from mltrain.inference.ray_start import RayOptions, last_line, ray_runtime
from mltrain.progress import progress
from mltrain.text import counted

MAX_BLOCKS = 2000  # input blocks of a dataset: a gallery of millions gets blocks of batches
GPU_THREADS = 4  # decoding threads of an actor that feeds a GPU
# An actor's start (a new process importing torch, the model built) costs about what it takes
# to embed 4 batches on a CPU core, so the default pool has at most one actor per 4 batches.
MIN_BATCHES_PER_ACTOR = 4


@dataclass
class RayEmbedder(Embedder):
    """An `Embedder` that embeds path lists on Ray actors (see the module docstring). Made
    by `ray_embedder`, valid while its Ray connection is."""

    options: RayOptions = field(default_factory=RayOptions)
    weights: Any = field(default=None, repr=False)  # object ref of the model's state dict

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
        """Embeddings (float32) in `paths` order, one actor batch at a time."""
        import ray

        if not paths:
            return
        ds, blocks = self._dataset(paths)
        expected = 0
        try:
            for out in progress(ds.iter_batches(batch_size=None, batch_format="numpy"),
                                desc=desc, total=blocks):  # fmt: skip
                expected = _checked_rows(out, expected)
                yield np.asarray(out["embedding"], dtype=np.float32)
        except ray.exceptions.RayError as e:
            raise MltrainError(
                f"a Ray embedding actor failed ({last_line(e)}); see the worker logs "
                "under /tmp/ray/session_latest/logs on its node"
            ) from None
        if expected != len(paths):
            raise MltrainError(f"Ray returned {expected} of {len(paths)} embeddings")

    def _dataset(self, paths: list[Path]) -> tuple[Any, int]:
        """The Ray dataset of (row, path) blocks mapped through the actor pool, and its block
        count (one output block per input block)."""
        import pyarrow as pa
        import ray.data

        n, batch = len(paths), self.cfg.eval.batch_size
        rows = batch * max(1, math.ceil(n / (batch * MAX_BLOCKS)))
        table = pa.table({"row": np.arange(n, dtype=np.int64),
                          "path": [str(Path(p).absolute()) for p in paths]})  # fmt: skip
        blocks = [table.slice(s, rows) for s in range(0, n, rows)]
        actors, threads = self.shape(len(blocks))
        # The runner a single process would take for the whole job; torch on actors' GPUs
        runner = "torch" if self.gpus_per_actor else self.runner_for(n, min(n, batch))
        with warnings.catch_warnings():  # max_restarts is named in no other way yet
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = self._mapped(ray.data.from_arrow(blocks), actors, threads, runner)
        return ds, len(blocks)

    def _graph(self, runner: str) -> Any:
        """For OpenVINO, the model's ONNX graph in the object store: the bundle's, else one
        traced in this process rather than in every actor (a trace costs seconds of CPU on
        a busy machine). None where the tracer cannot run: the actors then convert it."""
        import ray

        if runner != "openvino":
            return None
        graph = self.graph or _trace(self)
        return None if graph is None else ray.put(graph)

    def _mapped(self, ds: Any, actors: int, threads: int, runner: str) -> Any:
        import ray.data

        gpus = self.gpus_per_actor
        return ds.map_batches(
            _EmbedActor,
            fn_constructor_kwargs={
                "cfg": self.cfg, "num_classes": _num_classes(self), "weights": self.weights,
                "threads": threads, "device": "cuda" if gpus else "cpu", "runner": runner,
                "graph": self._graph(runner),
            },
            batch_size=None,  # one block is one batch
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
            num_gpus=gpus,
            max_restarts=0,  # a crash is reported, not retried on the same image for ever
        )  # fmt: skip

    @property
    def gpus_per_actor(self) -> float:
        if self.options.gpus is not None:
            return float(self.options.gpus)
        return 1.0 if self.device.type == "cuda" else 0.0

    def shape(self, blocks: int | None = None) -> tuple[int, int]:
        """(actors, CPU threads per actor) for a job of `blocks` batches (None: the largest
        pool). Actors: `options.actors`, else as many as the cluster's CPUs (or GPUs) hold,
        and unasked at most one per `MIN_BATCHES_PER_ACTOR` batches (starting one costs
        batches' worth of time); never more than batches. Threads: `options.threads`; else
        `GPU_THREADS` decoders beside a GPU; on a local Ray its CPUs shared among the actors
        (one actor on 2 CPUs uses both); 1 on a cluster, one single-threaded actor per core.
        A local Ray cannot grow, so a pool larger than it is refused rather than left
        waiting."""
        import ray

        gpus, local = self.gpus_per_actor, self.options.address is None
        have = ray.cluster_resources()
        cpus, gpus_there = int(have.get("CPU", 1)), float(have.get("GPU", 0))
        threads = self.options.threads or (GPU_THREADS if gpus else 1)
        fits = int(gpus_there // gpus) if gpus else cpus // threads
        actors = self.options.actors or max(1, fits)
        if local and actors > fits:
            need = f"{gpus:g} GPU" if gpus else f"{threads} CPU"
            raise ConfigError(
                f"a pool of {counted(actors, 'Ray actor')} x {need} does not fit this machine's "
                f"Ray ({cpus} CPUs, {gpus_there:g} GPUs); give fewer with --ray-actors or "
                "--ray-threads (--ray-gpus 0 embeds on CPU), or join a cluster with --ray ADDRESS"
            )
        if blocks is not None:  # no actor without a batch of its own
            per_actor = 1 if self.options.actors else MIN_BATCHES_PER_ACTOR
            actors = min(actors, max(1, math.ceil(blocks / per_actor)))
        if local and not gpus and not self.options.threads:
            threads = max(1, cpus // actors)
        return actors, threads


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
    """One actor of the pool: builds the model once, then embeds one batch of paths a call,
    as `Embedder.embed` would (same dataset, transform, chunks, precision and flip).

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
        yield pool


def on_ray(embedder: Embedder, options: RayOptions | None) -> contextlib.AbstractContextManager:
    """`ray_embedder(embedder, options)`, or `embedder` itself when `options` is None: the one
    line a caller needs to embed either way."""
    return contextlib.nullcontext(embedder) if options is None else ray_embedder(embedder, options)
