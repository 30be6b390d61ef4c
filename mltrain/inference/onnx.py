"""The embedding model as an ONNX graph, run by onnxruntime: export, parity check, session.

Export uses `torch.onnx.export(dynamo=False)` (the TorchScript tracer). Both exporters give
the same graph quality for timm's EfficientNet-Lite with avg/GeM pooling, the linear neck,
BNNeck and the normalisation (worst cosine against PyTorch fp32 >= 0.9999999 on this
repository's models), but the tracer exports tf_efficientnet_lite0 in 0.3 s against 4.6 s
for the dynamo exporter and needs no onnxscript; the dynamo exporter is the fallback for a
torch that no longer ships the tracer. The graph is fp32 with a dynamic batch axis: input
`images` (N, 3, H, W) normalised like the model's inputs, output `embeddings` (N, D), the
same as `EmbeddingModel.embed` (BNNeck and L2 normalisation included).

An exported graph is only kept when onnxruntime reproduces PyTorch on a probe batch (every
embedding's cosine >= `PARITY_MIN`); `export_checked` raises otherwise.

onnx and onnxruntime are an optional extra, imported only here and only when used.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mltrain.errors import MltrainError
from mltrain.model.network import EmbeddingModel

ONNX_EXTRA = "install the onnx extra: pip install -e '.[onnx]'"
OPSET = 17
PARITY_MIN = 0.9999  # worst per-image cosine, onnxruntime vs PyTorch fp32
INPUT, OUTPUT = "images", "embeddings"


class OnnxUnavailable(MltrainError):
    """onnxruntime (or the exporter's dependencies) are not installed."""


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxUnavailable(f"onnxruntime is not installed; {ONNX_EXTRA}") from None
    return onnxruntime


def require_onnx() -> None:
    """Refuse `--onnx` up front when the exporter's or runtime's packages are missing."""
    _ort()
    if importlib.util.find_spec("onnx") is None:
        raise OnnxUnavailable(f"onnx is not installed; {ONNX_EXTRA}")


def ort_version() -> str:
    return str(_ort().__version__)


class _Embed(nn.Module):
    """`model.embed` as `forward`, which is what the exporter traces."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def export_bytes(model: EmbeddingModel, probe: torch.Tensor) -> bytes:
    """The serialised ONNX graph of `model.embed` (fp32, CPU, dynamic batch axis)."""
    net = _Embed(copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format))
    net.eval()
    x = probe[:2].float().cpu().contiguous()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's deprecation and tracing notes
        try:
            try:
                torch.onnx.export(net, (x,), buf, input_names=[INPUT], output_names=[OUTPUT],
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                                  opset_version=OPSET, dynamo=False)  # fmt: skip
            except (TypeError, NotImplementedError):  # a torch without the tracer: dynamo
                buf = io.BytesIO()
                _export_dynamo(net, x, buf)
        except MltrainError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters raise many types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise MltrainError(f"ONNX export of {type(model.trunk).__name__} failed "
                               f"({type(e).__name__}: {first}); export without --onnx") from None
    return buf.getvalue()


def _export_dynamo(net: nn.Module, x: torch.Tensor, buf: io.BytesIO) -> None:
    if importlib.util.find_spec("onnxscript") is None:
        raise OnnxUnavailable(f"this torch exports ONNX through onnxscript; {ONNX_EXTRA}")
    program = torch.onnx.export(net, (x,), input_names=[INPUT], output_names=[OUTPUT],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                opset_version=OPSET, dynamo=True)  # fmt: skip
    program.model_proto  # noqa: B018 - materialise before saving
    buf.write(program.model_proto.SerializeToString())


# Sessions that a forked child inherited. Destroying one in the child would wait forever
# on a condition variable of the parent's thread pool (whose threads the child does not
# have; seen as a hung DataLoader worker), so the child keeps them until it exits.
_LIVE: weakref.WeakSet[OnnxSession] = weakref.WeakSet()
_INHERITED: list[Any] = []


def _keep_inherited_sessions() -> None:
    for s in list(_LIVE):
        if s._session is not None:
            _INHERITED.append(s._session)
            s._session = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_keep_inherited_sessions)


class OnnxSession:
    """An onnxruntime session that stands in for an `EmbeddingModel` at inference:
    `embed(x)` takes a float tensor batch and returns the embeddings as a float32 CPU tensor,
    so `mltrain.inference.batching` runs it unchanged. Calling it is `embed` too (the graph
    has no other output; note that calling an `EmbeddingModel` is its `forward`, which stops
    before BNNeck and normalisation: inference code calls `.embed` on either).

    Sessions are not fork-safe, so the session is built lazily in each process that uses it:
    a loader worker forked with this object builds its own, with the thread count the worker
    runs with (one), and never touches (or frees) the parent's, see `_INHERITED`.
    """

    def __init__(self, graph: bytes, normalize: bool, threads: int | None = None) -> None:
        self.graph = graph
        self.normalize = normalize  # read by flip TTA, like EmbeddingModel.normalize
        self.threads = threads
        self._session: Any = None
        self._pid = -1
        _ort()
        _LIVE.add(self)

    def session(self):
        if self._session is not None and self._pid != os.getpid():
            _INHERITED.append(self._session)  # forked without the hook: keep, never free
            self._session = None
        if self._session is None:
            ort = _ort()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads or torch.get_num_threads()
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # errors only
            try:
                self._session = ort.InferenceSession(
                    self.graph, opts, providers=["CPUExecutionProvider"]
                )
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                raise MltrainError(f"onnxruntime cannot load the ONNX graph ({e}); re-export "
                                   "it") from None  # fmt: skip
            self._pid = os.getpid()
        return self._session

    def embed(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        if from_prefix:
            raise MltrainError("the ONNX graph embeds images, not cached prefix features")
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session().run([OUTPUT], {INPUT: arr})[0]
        return torch.from_numpy(out)

    __call__ = embed

    def eval(self) -> OnnxSession:
        return self

    def __getstate__(self) -> dict[str, Any]:  # a pickled copy (spawned worker) rebuilds
        return {**self.__dict__, "_session": None, "_pid": -1}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _LIVE.add(self)


def worst_cosine(model: EmbeddingModel, session: OnnxSession, probe: torch.Tensor) -> float:
    """The lowest cosine between PyTorch fp32 and onnxruntime embeddings of `probe`."""
    ref_model = copy.deepcopy(model).float().cpu().eval()
    with torch.inference_mode():
        want = ref_model.embed(probe.float().cpu())
        got = session.embed(probe)
    if not torch.isfinite(got).all():
        return float("nan")
    return float(F.cosine_similarity(want.float(), got.float(), dim=1).min())


@dataclass(frozen=True)
class Parity:
    worst_cosine: float
    probe_images: int
    probe: str  # "gallery" images or normalised "noise"

    def record(self) -> dict[str, Any]:
        """The manifest's account of the check."""
        return {"opset": OPSET, "onnxruntime": ort_version(),
                "exporter": f"torch.onnx {torch.__version__}",
                "worst_cosine": self.worst_cosine, "probe_images": self.probe_images,
                "probe": self.probe, "min_cosine": PARITY_MIN}  # fmt: skip


def export_checked(
    model: EmbeddingModel, probe: torch.Tensor, probe_kind: str, threads: int | None = None
) -> tuple[bytes, Parity]:
    """(graph, parity) for `model`, refusing a graph whose embeddings of `probe` differ from
    PyTorch's: a wrong graph would answer searches quietly wrong, so it is never written."""
    graph = export_bytes(model, probe)
    session = OnnxSession(graph, model.normalize, threads)
    cos = worst_cosine(model, session, probe)
    if not cos >= PARITY_MIN:  # NaN fails too
        raise MltrainError(
            f"ONNX export refused: onnxruntime's embeddings differ from PyTorch's (worst cosine "
            f"{cos:.6f} < {PARITY_MIN} over {len(probe)} {probe_kind} images); export without "
            "--onnx"
        )
    return graph, Parity(cos, len(probe), probe_kind)


def noise_probe(input_size: tuple[int, int, int], n: int = 4, seed: int = 0) -> torch.Tensor:
    """Random images normalised like real ones (roughly zero mean, unit spread), for when no
    gallery image is at hand."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *input_size, generator=g)
