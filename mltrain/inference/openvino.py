"""The embedding model compiled by OpenVINO for the CPU: bf16 where the CPU has it, several
requests in flight for bulk embedding, one synchronous request for a query.

OpenVINO reads the model as an ONNX graph: a bundle's model.onnx, or the model traced in
memory by `mltrain.inference.onnx.export_bytes` where there is none. `openvino.convert_model`
of the PyTorch module is the fallback where the tracer cannot run: it took 18.4 s against 8.0 s
for the trace of tf_efficientnet_lite0 on the same (loaded) machine. Reading a graph takes
0.05 s, compiling 0.15-0.5 s.

Two compiled copies share the read model, each made when first needed:
- LATENCY (one stream on every thread) runs a call of at most `single_max` images as one
  synchronous request: queries, whose latency is what a user waits for;
- THROUGHPUT (one single-threaded stream per thread) runs a larger call as chunks of `chunk`
  images spread over its requests (`AsyncInferQueue`): bulk embedding.

End to end on 400 Caltech101 images (benchmarks/embed.py, load average 1.9, decode in 2
loader workers), chunks of 4 on the requests ran 156 img/s, one synchronous request per chunk
of 8 157, chunks of 8 137 and of 16 120 (torch bf16: 118): `BULK_CHUNK` is 4.

Precision: the CPU's bf16 (`INFERENCE_PRECISION_HINT`) where `OPTIMIZATION_CAPABILITIES`
lists BF16, else fp32. A runner is only used once it reproduces PyTorch fp32 on a probe
batch (`checked_runner`): fp32 as closely as the ONNX graph must (`PARITY_MIN`), bf16 within
`BF16_MIN`, the rounding of bf16 arithmetic rather than a wrong graph.

openvino is an optional extra, imported only here and only when used.
"""

from __future__ import annotations

import copy
import importlib.util
import threading
import warnings
from typing import Any

import numpy as np
import torch

from mltrain.errors import MltrainError
from mltrain.inference.onnx import PARITY_MIN, _Embed, export_bytes, worst_cosine
from mltrain.model.network import EmbeddingModel

BULK_CHUNK = 4  # images per request in bulk calls (measured, see above)
SINGLE_MAX = 8  # calls of up to this many images run as one synchronous request
OPENVINO_EXTRA = "install the openvino extra: pip install -e '.[openvino]'"
# bf16 embeddings of tf_efficientnet_lite0 (GeM) against PyTorch fp32: worst cosine 0.99970 on
# 8 noise images, 0.9950 over 256 Caltech101 images, where PyTorch's own bf16 autocast gives
# 0.9954. A wrong graph lands far below (cosines of unrelated vectors).
BF16_MIN = 0.999


# Every OpenVINO runner of this process, kept until it exits. Freeing compiled models and then
# forking (DataLoader workers) crashed the parent later with a segmentation fault (measured with
# openvino 2026.4: two runners built, used and freed, a loader forked, then a subprocess started);
# runners kept alive never did. A process builds one or two, so keeping them costs little.
_KEPT: list[Any] = []
_CORE: list[Any] = []  # the one openvino.Core of this process, made on first use


class OpenVinoUnavailable(MltrainError):
    """openvino is not installed."""


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _ov():
    try:
        import openvino
    except ImportError:
        raise OpenVinoUnavailable(f"openvino is not installed; {OPENVINO_EXTRA}") from None
    return openvino


def cpu_precision(core: Any) -> str:
    """"bf16" where the CPU computes in bf16 natively (AVX512-BF16 / AMX), else "f32"."""
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in caps else "f32"


class OpenVinoModel:
    """A compiled OpenVINO model that stands in for an `EmbeddingModel` at inference, as
    `OnnxSession` does: `embed(x)` takes a float batch (N, 3, H, W) and returns the
    embeddings as a float32 CPU tensor. Calls are serialised by a lock (the service may call
    from several threads); the requests within a call run in parallel."""

    def __init__(self, graph: Any, normalize: bool, threads: int | None = None,
                 precision: str | None = None, chunk: int = BULK_CHUNK,
                 single_max: int = SINGLE_MAX) -> None:  # fmt: skip
        """`graph`: ONNX bytes, or an `openvino.Model` already converted."""
        ov = _ov()
        self.normalize = normalize  # read by flip TTA, like EmbeddingModel.normalize
        self.threads = threads or torch.get_num_threads()
        self.chunk, self.single_max = max(chunk, 1), single_max
        if not _CORE:
            _CORE.append(ov.Core())
        self._core = _CORE[0]
        self._model = graph
        if isinstance(graph, bytes):
            try:
                self._model = self._core.read_model(graph)
            except Exception as e:  # noqa: BLE001 - openvino raises its own types
                raise MltrainError(f"OpenVINO cannot read the ONNX graph "
                                   f"({_first_line(e)})") from None  # fmt: skip
        self.precision = precision or cpu_precision(self._core)
        self._compiled: dict[str, Any] = {}
        self._request: Any = None
        self._queue: Any = None
        self._lock = threading.Lock()
        _KEPT.append(self)

    def compiled(self, hint: str) -> Any:
        """The model compiled for `hint` ("LATENCY" or "THROUGHPUT"), once."""
        if hint not in self._compiled:
            config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": hint,
                      "INFERENCE_NUM_THREADS": self.threads}  # fmt: skip
            try:
                self._compiled[hint] = self._core.compile_model(self._model, "CPU", config)
            except Exception as e:  # noqa: BLE001
                raise MltrainError(f"OpenVINO cannot compile the model "
                                   f"({_first_line(e)})") from None
        return self._compiled[hint]

    def embed(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        if from_prefix:
            raise MltrainError("the OpenVINO model embeds images, not cached prefix features")
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            out = self._single(arr) if len(arr) <= self.single_max else self._bulk(arr)
        return torch.from_numpy(out)

    __call__ = embed

    def eval(self) -> OpenVinoModel:
        return self

    def _single(self, arr: np.ndarray) -> np.ndarray:
        if self._request is None:
            self._request = self.compiled("LATENCY").create_infer_request()
        self._request.infer({0: arr})
        return self._request.get_output_tensor(0).data.copy()

    def _bulk(self, arr: np.ndarray) -> np.ndarray:
        """Chunks of `chunk` images on every request of the THROUGHPUT copy at once."""
        if self._queue is None:
            compiled = self.compiled("THROUGHPUT")
            requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self._queue = _ov().AsyncInferQueue(compiled, max(requests, 1))
        starts = range(0, len(arr), self.chunk)
        out: list[Any] = [None] * len(starts)

        def done(request: Any, i: int) -> None:
            out[i] = request.get_output_tensor(0).data.copy()

        self._queue.set_callback(done)
        for i, s in enumerate(starts):
            self._queue.start_async({0: arr[s : s + self.chunk]}, i)
        self._queue.wait_all()
        if any(o is None for o in out):
            raise MltrainError("OpenVINO returned no embeddings for part of a batch")
        return np.concatenate(out)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def from_torch(model: EmbeddingModel, probe: torch.Tensor) -> Any:
    """`model.embed` as ONNX bytes (the tracer), or as an `openvino.Model` converted by
    OpenVINO itself where the tracer cannot run."""
    try:
        return export_bytes(model, probe)
    except MltrainError:
        pass
    net = _Embed(copy.deepcopy(model).float().cpu().eval())
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _ov().convert_model(net, example_input=probe[:2].float().cpu())
    except Exception as e:  # noqa: BLE001 - converters raise many types
        raise MltrainError(f"OpenVINO cannot convert the model ({_first_line(e)})") from None


def checked_runner(
    model: EmbeddingModel, probe: torch.Tensor, graph: bytes | None = None,
    threads: int | None = None, chunk: int = BULK_CHUNK,
) -> tuple[OpenVinoModel, float]:  # fmt: skip
    """(runner, worst cosine on `probe`) for `model`, from `graph` (its ONNX graph) or a
    trace of it. Raises `MltrainError` when the runner's embeddings differ from PyTorch
    fp32's by more than its precision explains: a wrong runner would answer quietly wrong."""
    source = graph if graph is not None else from_torch(model, probe)
    runner = OpenVinoModel(source, model.normalize, threads, chunk=chunk)
    cos = worst_cosine(model, runner, probe)
    need = BF16_MIN if runner.precision == "bf16" else PARITY_MIN
    if not cos >= need:  # NaN fails too
        raise MltrainError(f"OpenVINO ({runner.precision}) refused: its embeddings differ from "
                           f"PyTorch fp32's (worst cosine {cos:.6f} < {need} over "
                           f"{len(probe)} probe images)")  # fmt: skip
    return runner, cos


def require_openvino() -> None:
    """Refuse `backend: openvino` up front, in one line, where openvino is not installed."""
    if not openvino_available():
        raise OpenVinoUnavailable(f"backend openvino: openvino is not installed; {OPENVINO_EXTRA}")
