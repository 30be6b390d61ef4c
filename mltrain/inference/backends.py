"""Which runner embeds under `backend: auto`: the one whose estimated time for the job is least.

A job is `images` images arriving `per_call` at a time: a folder embedded in batches (export,
add, evaluate) or queries (search, verify, serve). Its time on a runner is the runner's setup
beyond the PyTorch model (which every runner builds: preprocessing and parity come from it)
plus `images` times the runner's seconds per image at that call size, decode included.

`COSTS` holds those figures for tf_efficientnet_lite0 at 224 px on the 2-core AVX512-BF16
machine, from runs at load average 1.2-2.4 (docs/performance.md): one image per call is the
model alone at batch 1 (benchmarks/onnx_backend.py; decoding a query costs every runner the
same); bulk is each runner's end-to-end img/s on 1,000 Caltech101 images with nothing else
running (benchmarks/embed.py: torch 161, onnxruntime 112, OpenVINO 204); setup is the build and
first image, OpenVINO's with its import, and TRACE_S the trace where no model.onnx is at hand.
Re-measure with those two benchmarks and change `COSTS`: nothing else holds these numbers. On
other hardware the order may differ; `--backend` / `eval.backend` names a runner outright.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from mltrain.errors import ConfigError

RUNNERS = ("torch", "onnx", "openvino")
BACKENDS = ("auto", *RUNNERS)  # what --backend and eval.backend take
SINGLE_MAX = 8  # calls of up to this many images count as queries (the latency path)
SERVICE_IMAGES = 10_000  # a server's job: it answers many queries, one image at a time


@dataclass(frozen=True)
class Cost:
    setup_s: float  # building the runner from an ONNX graph at hand
    single_ms: float  # per image, calls of one to SINGLE_MAX images
    bulk_ms: float  # per image, batches of eval.batch_size, loader decode included


COSTS = {
    "torch": Cost(0.14, 11.6, 6.2),  # setup: BatchNorm folded
    "onnx": Cost(0.06, 8.3, 8.9),
    "openvino": Cost(1.0, 4.3, 4.9),  # setup: import, compile, parity check
}
# Tracing the model into an ONNX graph when none is at hand (OpenVINO without model.onnx).
TRACE_S = 0.5


def check_backend(backend: str, where: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"{where} {backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def job_seconds(runner: str, images: int, per_call: int, traced: bool = False,
                ready: bool = False) -> float:  # fmt: skip
    """Estimated seconds for `runner` to embed `images` images, `per_call` per call; a
    `ready` runner (built by an earlier job) costs no setup."""
    cost = COSTS[runner]
    per_image = cost.single_ms if per_call <= SINGLE_MAX else cost.bulk_ms
    setup = cost.setup_s + (TRACE_S if traced and runner == "openvino" else 0.0)
    return (0.0 if ready else setup) + max(images, 0) * per_image / 1e3


def fastest(runners: Iterable[str], images: int, per_call: int, traced: bool = False,
            ready: Collection[str] = ()) -> str:  # fmt: skip
    """The runner of `runners` with the least `job_seconds` (ties: the earlier one);
    `traced`: OpenVINO must trace the model first (no ONNX graph at hand); `ready`: runners
    already built, whose setup is paid."""
    options = list(runners)
    if not options:
        raise ConfigError("no inference runner to choose from")
    return min(options, key=lambda r: job_seconds(r, images, per_call, traced, r in ready))
