"""onnxruntime against PyTorch by batch size, through the path the server's micro-batches take
(`embed_tensor` on the embedder's `forward_model`): what `--backend auto` is chosen on.

Usage: python benchmarks/onnx_batches.py [--batches 1 2 4 8 16] [--rounds 3]
Prints img/s per batch size for torch (search's default: BatchNorm folded, bf16 autocast where
the CPU has it) and onnxruntime fp32, medians of interleaved rounds, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mltrain.config import Config  # noqa: E402
from mltrain.inference import onnx as ox  # noqa: E402
from mltrain.inference.batching import embed_tensor  # noqa: E402
from mltrain.inference.embedder import make_embedder  # noqa: E402
from mltrain.model.network import build_model  # noqa: E402


def rate(embedder, x: torch.Tensor, images: int) -> float:
    """img/s of `embedder` on batch `x`, over about `images` images after one warm-up call."""
    embed_tensor(embedder.forward_model, x, embedder.spec)
    calls = max(2, images // len(x))
    start = time.perf_counter()
    for _ in range(calls):
        embed_tensor(embedder.forward_model, x, embedder.spec)
    return calls * len(x) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[int, tuple[float, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="offline", help="offline | false")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=32, help="images per measurement")
    args = p.parse_args(argv)
    cfg = Config()
    cfg.model.backbone = args.backbone
    cfg.model.pretrained = False if args.pretrained == "false" else args.pretrained
    torch_embedder = make_embedder(cfg, build_model(cfg.model))
    size = torch_embedder.dcfg["input_size"]
    graph, parity = ox.export_checked(torch_embedder.model, ox.noise_probe(size), "noise")
    onnx_embedder = torch_embedder.with_backend(
        "onnx", ox.OnnxSession(graph, torch_embedder.model.normalize))
    print(f"{args.backbone} {size}, {torch.get_num_threads()} threads, parity worst cosine "
          f"{parity.worst_cosine:.7f}")  # fmt: skip
    rates: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for b in args.batches:
            x = torch.randn(b, *size)
            for name, e in (("torch", torch_embedder), ("onnx", onnx_embedder)):
                rates.setdefault((b, name), []).append(rate(e, x, args.images))
    print("| batch | torch img/s | onnxruntime img/s | onnx / torch |")
    print("|---:|---:|---:|---:|")
    out = {}
    for b in args.batches:
        t, o = np.median(rates[(b, "torch")]), np.median(rates[(b, "onnx")])
        out[b] = (float(t), float(o))
        print(f"| {b} | {t:.1f} | {o:.1f} | {o / t:.2f} |")
    return out


if __name__ == "__main__":
    main()
