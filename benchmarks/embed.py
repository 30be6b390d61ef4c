"""Embedding throughput: a naive notebook loop versus mltrain's inference path.

    python benchmarks/embed.py [--images N] [--root PATH] [--batch 64] [--rounds 2]

On the same N images (default 1000, spread evenly over the classes; 0 = all), times
(a) the naive loop: PIL decode at full size, torchvision bicubic Resize/CenterCrop/ToTensor/
    Normalize, fp32, NCHW, no workers, `torch.no_grad`;
(b) the project path: `embedder_from_backbone(cfg).embed(paths)` (JPEG draft decoding, cv2
    resize, BatchNorm folded, channels_last, bf16 autocast where the CPU has it,
    inference_mode, and on CPU the model run in chunks of 8 inside the loader workers);
(c) the project path with `eval.amp=off` (fp32), to isolate the bf16 gain, and (e) with
    `eval.fold_bn=false`, to isolate BatchNorm folding;
(f) the model in this process with all threads while the workers only decode
    (`eval.model_in_workers=false`), and (g) that with whole batches (`eval.cpu_chunk=0`);
(d) decode-only throughput of both pipelines (no model).

A second table (`--backends`, default onnx,openvino; add `compile` for torch.compile, whose
compilation takes minutes on 2 cores) runs the other runners on the same images, decode
included: onnxruntime fp32, OpenVINO fp32 and bf16 with one synchronous request per chunk of 8
or its requests in flight together (chunks of 4, 8, 16), and torch.compile; with its model
only throughput on `--model-images` decoded images, its setup seconds, its worst cosine to
torch fp32 and its precision@1 against torch fp32's, and which runner `eval.backend: auto`
takes for this many images.
Variants run interleaved in `--rounds` rounds over disjoint parts of the images, each after
an untimed warm-up batch, so that a shared machine's load hits them alike; every figure is
also given as a ratio to the naive loop measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import math
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/embed.py`
    import common  # type: ignore[no-redef]

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from mltrain.config import Config, load_config  # noqa: E402
from mltrain.data.dataset import default_num_workers  # noqa: E402
from mltrain.data.pipeline import decode_size, eval_loader, inference_workers  # noqa: E402
from mltrain.evaluation.metrics import retrieval_metrics  # noqa: E402
from mltrain.inference.backends import RUNNERS, fastest, job_seconds  # noqa: E402
from mltrain.inference.batching import _embed_fn, apply, extract_embeddings  # noqa: E402
from mltrain.inference.embedder import Embedder, embedder_from_backbone  # noqa: E402
from mltrain.inference.onnx import (  # noqa: E402
    OnnxSession,
    export_bytes,
    noise_probe,
    onnxruntime_available,
)
from mltrain.inference.openvino import BULK_CHUNK, OpenVinoModel, openvino_available  # noqa: E402
from mltrain.runtime import (  # noqa: E402
    resolve_amp,
    resolve_device,
    usable_cpus,  # noqa: E402
)

TARGET_IMG_S = 100.0
TARGET_SPEEDUP = 10.0
TARGET_P1_POINTS = 0.2


def naive_transform(dcfg: dict) -> T.Compose:
    """The torchvision recipe with the backbone's own geometry and normalisation."""
    _, h, w = dcfg["input_size"]
    return T.Compose([
        T.Resize(decode_size(dcfg), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(dcfg["mean"], dcfg["std"]),
    ])


def naive_batches(paths: list[Path], transform: T.Compose, batch: int):
    for start in range(0, len(paths), batch):
        images = []
        for p in paths[start : start + batch]:
            with Image.open(p) as img:
                images.append(transform(img.convert("RGB")))
        yield torch.stack(images)


def naive_embed(model: torch.nn.Module, paths: list[Path], transform: T.Compose,
                batch: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for x in naive_batches(paths, transform, batch):
            out.append(model.embed(x).numpy())
    return np.concatenate(out)


def project_decode(cfg: Config, dcfg: dict, paths: list[Path]) -> int:
    labels = np.zeros(len(paths), dtype=np.int64)
    return sum(len(x) for x, _, _ in eval_loader(cfg, paths, labels, dcfg))


def naive_decode(transform: T.Compose, paths: list[Path], batch: int) -> int:
    return sum(len(x) for x in naive_batches(paths, transform, batch))


def precision_at_1(emb: np.ndarray, labels: np.ndarray) -> float:
    metrics, _ = retrieval_metrics(emb, labels, ks=(1,))
    return metrics["precision_at_1"]


def build(args: argparse.Namespace):
    overrides = common.model_overrides(args)
    probe = load_config(common.CONFIGS / "pooling.yaml", overrides)
    root = common.data_root(args.root, probe)
    cfg = common.config_for("pooling", root, [*overrides, f"eval.batch_size={args.batch}",
                                              "eval.backend=torch"])
    folder = common.scan(cfg)
    picked = common.sample_evenly(folder, args.images)
    paths = [folder.paths[i] for i in picked]
    labels = folder.labels[picked]
    return cfg, root, paths, labels


class Compiled(torch.nn.Module):
    """`torch.compile` of a model's `embed`, standing in for the model in the batching code.
    A short last chunk is padded to `size` images: one compiled shape, no recompiling."""

    def __init__(self, model: torch.nn.Module, size: int) -> None:
        super().__init__()
        self.model, self.normalize, self.size = model, model.normalize, size
        self._embed = torch.compile(model.embed, dynamic=False)

    def embed(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        n = len(x)
        if n < self.size:
            x = torch.cat([x, x.new_zeros(self.size - n, *x.shape[1:])])
        return self._embed(x)[:n]


def backend_variants(chosen: set[str], bf16: Embedder, fp32: Embedder) -> dict:
    """{key: (label, embedder, spec)} of the other runners, the model in this process unless
    the label says otherwise; loader workers decode."""
    here = replace(fp32.spec, in_workers=False)
    rows: dict = {}
    graph = None
    if chosen & {"onnx", "openvino"}:
        graph = export_bytes(bf16.model, noise_probe(tuple(bf16.dcfg["input_size"]), 2))
    if "onnx" in chosen and onnxruntime_available():
        e = bf16.with_backend("onnx", OnnxSession(graph, bf16.model.normalize))
        rows["ort"] = ("onnxruntime fp32, chunks of 8, model in the workers", e, e.spec)
    if "openvino" in chosen and openvino_available():
        precisions = ["f32"]
        probe = OpenVinoModel(graph, bf16.model.normalize)
        if probe.precision == "bf16":
            precisions.append("bf16")
        for prec in precisions:
            for chunk, sync in ((8, True), (4, False), (8, False), (16, False)):
                if prec == "f32" and not sync and chunk != BULK_CHUNK:
                    continue
                runner = OpenVinoModel(graph, bf16.model.normalize, precision=prec, chunk=chunk)
                e = replace(bf16, backend="openvino", openvino=runner, _on={})
                spec = replace(e.spec, cpu_chunk=chunk) if sync else e.spec
                how = ("one synchronous request per chunk of 8" if sync else
                       f"chunks of {chunk} on all requests at once")
                rows[f"ov {prec} {'sync' if sync else 'async'} {chunk}"] = (
                    f"OpenVINO {prec}, {how}", e, spec)
    if "compile" in chosen:
        e = replace(bf16, _fast=Compiled(bf16.forward_model, bf16.cfg.eval.cpu_chunk), _on={})
        rows["compile"] = ("torch.compile (BatchNorm folded, amp as (b)), chunks of 8", e,
                           replace(here, amp=bf16.amp, channels_last=True))
    return rows


def model_only(model: torch.nn.Module, x: torch.Tensor, spec, batch: int):
    """A round function: the model on decoded tensors `x` in loader-sized batches."""
    fn = _embed_fn(model, False)

    def run(_: int) -> int:
        with torch.inference_mode():
            for s in range(0, len(x), batch):
                apply(fn, x[s : s + batch], spec)
        return len(x)

    return run


def print_backends(rows: dict, rate: dict, counts: dict, out: dict, labels: np.ndarray,
                   setup: dict, n: int, batch: int) -> dict:  # fmt: skip
    """The second table: every runner against torch fp32 and the naive loop."""
    base_p1 = precision_at_1(out["fp32"], labels)
    table, summary = [], {}
    for key, label in rows.items():
        worst = float(np.min(np.sum(out[key] * out["fp32"], axis=1)))
        diff = 100 * (precision_at_1(out[key], labels) - base_p1)
        model = rate.get(f"model {key}", float("nan"))
        table.append([label, counts[key], rate[key], rate[key] / rate["naive"], model,
                      model / rate["model bf16"], setup.get(key, 0.0), f"{worst:.5f}", diff])
        summary[key] = {"img_s": rate[key], "worst_cos": worst, "p1_points": diff}
    print()
    print(common.markdown_table(
        ["runner (end to end: decode in loader workers)", "images", "img/s", "ratio vs naive",
         "model-only img/s", "model ratio vs torch bf16", "setup s",
         "worst cos vs torch fp32", "P@1 - torch fp32 (points)"], table))
    seconds = {r: job_seconds(r, n, batch, traced=True) for r in RUNNERS if r != "onnx"}
    print(f"eval.backend auto for {n} images in batches of {batch} (no ONNX graph at hand): "
          f"{fastest(list(seconds), n, batch, traced=True)} (estimates from "
          "mltrain.inference.backends.COSTS: "
          + ", ".join(f"{r} {v:.1f} s" for r, v in seconds.items()) + ")")
    print(f"{common.load_note()}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000,
                        help="images sampled evenly over the classes; 0 = all")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaving rounds (each variant embeds 1/rounds of the images "
                             "per round)")
    parser.add_argument("--naive-limit", type=int, default=0,
                        help="time the naive loop on at most this many of the images, spread "
                             "evenly (it is slow); 0 = all of them")
    parser.add_argument("--backends", default="onnx,openvino",
                        help="other runners for the second table, comma-separated: onnx, "
                             "openvino, compile (torch.compile); empty for none")
    parser.add_argument("--model-images", type=int, default=128,
                        help="decoded images held in memory for the model-only column")
    common.add_threads_arg(parser)
    common.add_model_args(parser)
    args = parser.parse_args(argv)
    threads = common.apply_threads(args.threads)

    cfg, root, paths, labels = build(args)
    rounds = max(1, min(args.rounds, len(paths) // max(args.batch, 1) or 1))
    bf16: Embedder = embedder_from_backbone(cfg)
    fp32_cfg = copy.deepcopy(cfg)
    fp32_cfg.eval.amp = "off"
    fp32 = embedder_from_backbone(fp32_cfg)
    fp32.model.load_state_dict(bf16.model.state_dict())  # identical weights even if random
    nofold_cfg = copy.deepcopy(cfg)
    nofold_cfg.eval.fold_bn = False
    nofold = embedder_from_backbone(nofold_cfg)
    nofold.model.load_state_dict(bf16.model.state_dict())
    threads_cfg = copy.deepcopy(cfg)
    threads_cfg.eval.model_in_workers = False
    inproc = embedder_from_backbone(threads_cfg)
    inproc.model.load_state_dict(bf16.model.state_dict())
    whole_cfg = copy.deepcopy(threads_cfg)
    whole_cfg.eval.cpu_chunk = 0
    whole = embedder_from_backbone(whole_cfg)
    whole.model.load_state_dict(bf16.model.state_dict())
    one_proc = copy.deepcopy(cfg)
    one_proc.data.num_workers = 0
    naive_model = copy.deepcopy(bf16.model).to(memory_format=torch.contiguous_format).float()
    naive_model.eval()
    transform = naive_transform(bf16.dcfg)
    amp = resolve_amp(cfg.eval.amp, resolve_device(cfg.train.device))
    workers = cfg.data.num_workers
    workers = default_num_workers() if workers is None else workers
    model_workers = inference_workers(cfg, 2 * cfg.eval.batch_size)
    amp_name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off (fp32)"}[amp]

    parts = [np.arange(r, len(paths), rounds) for r in range(rounds)]
    stride = 1
    if 0 < args.naive_limit < len(paths):
        stride = math.ceil(len(paths) / args.naive_limit)
    naive_parts = [p[::stride] for p in parts]
    n_naive = sum(len(p) for p in naive_parts)

    print(f"# embed benchmark: {len(paths)} images from {root} "
          f"({len(set(labels.tolist()))} classes), batch {args.batch}, {rounds} interleaved "
          f"rounds" + (f"; naive loop on {n_naive} of them" if stride > 1 else ""))
    print(f"backbone {cfg.model.backbone} (pretrained={cfg.model.pretrained}), input "
          f"{tuple(bf16.dcfg['input_size'][1:])}, project amp {amp_name}, loader workers "
          f"{model_workers} running the model ({workers} decoding in rows f/g; for >= 2 "
          f"batches), torch threads {threads}")
    print(common.load_note())

    # Warm-up: one batch through every variant, untimed.
    warm = paths[: args.batch]
    naive_embed(naive_model, warm, transform, args.batch)
    bf16.embed(warm)
    fp32.embed(warm)
    nofold.embed(warm)
    inproc.embed(warm)
    whole.embed(warm)
    naive_decode(transform, warm, args.batch)
    project_decode(one_proc, bf16.dcfg, warm)

    setup: dict[str, float] = {}
    others = backend_variants({b for b in args.backends.split(",") if b}, bf16, fp32)
    for key, (_, e, spec) in others.items():  # setup: compile or build, and the first batch
        with common.stopwatch(setup, key):
            extract_embeddings(e.forward_model, e._loader(warm, None), spec)
    out = {name: np.zeros((len(paths), bf16.model.embedding_dim), np.float32)
           for name in ("naive", "bf16", "fp32", "nofold", "threads", "whole", *others)}

    def e2e(name, fn, which):
        def run(r: int) -> int:
            idx = which[r]
            out[name][idx] = fn([paths[i] for i in idx])
            return len(idx)
        return run

    def decode(fn, which):
        return lambda r: fn([paths[i] for i in which[r]])

    variants = {
        "naive": e2e("naive", lambda p: naive_embed(naive_model, p, transform, args.batch),
                     naive_parts),
        "bf16": e2e("bf16", bf16.embed, parts),
        "fp32": e2e("fp32", fp32.embed, parts),
        "nofold": e2e("nofold", nofold.embed, parts),
        "threads": e2e("threads", inproc.embed, parts),
        "whole": e2e("whole", whole.embed, parts),
    }
    for key, (_, e, spec) in others.items():
        variants[key] = e2e(key, lambda p, e=e, s=spec: extract_embeddings(
            e.forward_model, e._loader(p, None), s)[0], parts)  # fmt: skip
    x = torch.cat([b for b, _, _ in bf16._loader(paths[: max(args.model_images, 1)], None)])
    model_variants = {"model bf16": model_only(bf16.forward_model, x, bf16.spec, args.batch),
                      "model fp32": model_only(fp32.forward_model, x, fp32.spec, args.batch)}
    for key, (_, e, spec) in others.items():
        model_variants[f"model {key}"] = model_only(e.forward_model, x, spec, args.batch)
    decode_variants = {
        "naive decode": decode(lambda p: naive_decode(transform, p, args.batch), naive_parts),
        "project decode": decode(lambda p: project_decode(cfg, bf16.dcfg, p), parts),
        "project decode 1 proc": decode(lambda p: project_decode(one_proc, bf16.dcfg, p), parts),
    }
    times: dict[str, float] = {}
    counts: dict[str, int] = {}
    cpu: dict[str, float] = {}
    wall = time.perf_counter()
    common.run_rounds(variants, rounds, times, counts, cpu)
    common.run_rounds(decode_variants, rounds, times, counts, cpu)
    common.run_rounds(model_variants, rounds, times, counts)
    wall = time.perf_counter() - wall

    rate = {k: counts[k] / times[k] for k in times}
    rows_spec = [
        ("naive", "(a) naive loop: PIL full decode, torchvision, fp32 NCHW, no workers", "naive"),
        ("bf16", f"(b) project path: .embed(), channels_last, amp {amp_name}, model in "
                 f"{model_workers} workers", "naive"),
        ("fp32", "(c) project path with eval.amp=off (fp32)", "naive"),
        ("nofold", "(e) project path with eval.fold_bn=false (BatchNorm unfolded)", "naive"),
        ("threads", f"(f) model in this process ({threads} threads), workers only decode",
         "naive"),
        ("whole", "(g) as (f), whole batches (eval.cpu_chunk=0; the previous default)",
         "naive"),
        ("naive decode", "(d) decode only, naive pipeline (1 process)", "naive decode"),
        ("project decode", f"(d) decode only, project loader ({model_workers} workers)",
         "naive decode"),
        ("project decode 1 proc", "(d) decode only, project pipeline, 0 workers",
         "naive decode"),
    ]
    rows = [[label, counts[k], times[k], rate[k], rate[k] / rate[base],
             1000 * cpu[k] / counts[k]] for k, label, base in rows_spec]
    print()
    print(common.markdown_table(
        ["variant", "images", "seconds", "img/s", "ratio vs naive", "CPU ms/img"], rows))
    print("(decode rows: ratio vs the naive decode row; CPU ms/img counts this process and "
          "its finished loader workers, spin-waiting included)")
    print(f"bf16 gain on the project path: {rate['bf16'] / rate['fp32']:.2f}x fp32; "
          f"BatchNorm folding: {rate['bf16'] / rate['nofold']:.2f}x unfolded; model in the "
          f"workers: {rate['bf16'] / rate['threads']:.2f}x in this process; chunks of "
          f"{cfg.eval.cpu_chunk}: {rate['threads'] / rate['whole']:.2f}x whole batches")
    cores = usable_cpus()
    bound = {k: cores * counts[k] / cpu[k] for k in ("naive", "bf16", "fp32") if cpu[k] > 0}
    if bound:
        print(f"idle-machine estimate from CPU time ({cores} cores x images / CPU seconds; "
              "assumes perfect scaling, and spin-waits on a busy machine inflate CPU time): "
              + ", ".join(f"{k} {v:.0f} img/s" for k, v in bound.items()))

    p1 = {k: precision_at_1(out[k], labels) for k in ("bf16", "fp32")}
    naive_idx = np.sort(np.concatenate(naive_parts))
    naive_labels = labels[naive_idx]
    if len(np.unique(naive_labels)) >= 2:
        p1["naive"] = precision_at_1(out["naive"][naive_idx], naive_labels)
    diff = 100 * (p1["bf16"] - p1["fp32"])
    cos = float(np.mean(np.sum(out["bf16"] * out["fp32"], axis=1)))
    print()
    naive_p1 = (f"{100 * p1['naive']:.2f}%" + (f" (on its {n_naive} images)" if stride > 1
                                                else "")) if "naive" in p1 else "n/a"
    print(f"precision@1 (leave-one-out, {len(paths)} images): project bf16 "
          f"{100 * p1['bf16']:.2f}%, project fp32 {100 * p1['fp32']:.2f}%, "
          f"difference {diff:+.2f} points; naive pipeline {naive_p1}")
    print(f"mean cosine(bf16 embedding, fp32 embedding) of the same image = {cos:.5f}")
    print()
    print(common.target_line("|bf16 - fp32 precision@1| points", abs(diff), TARGET_P1_POINTS,
                             higher_is_better=False))
    print(common.target_line("end-to-end img/s (project path)", rate["bf16"], TARGET_IMG_S))
    print(common.target_line("speed-up vs naive loop", rate["bf16"] / rate["naive"],
                             TARGET_SPEEDUP, unit="x"))
    self_mb = common.rss_mb()
    child_mb = common.rss_mb(resource.RUSAGE_CHILDREN)
    print(f"peak RSS: main process {self_mb:.0f} MiB; largest loader worker {child_mb:.0f} MiB "
          "(ru_maxrss; workers share the parent's pages copy-on-write)")
    print(f"timed part {wall:.0f} s; {common.load_note()}")
    backends = {}
    if others:
        rows = {"bf16": f"torch {amp_name} (row b, the project path)",
                "fp32": "torch fp32 (row c)", **{k: v[0] for k, v in others.items()}}
        backends = print_backends(rows, rate, counts, out,
                                  labels, setup, len(paths), args.batch)  # fmt: skip
    sys.stdout.flush()
    return {"backends": backends, "rate": rate, "counts": counts,
            "cpu": cpu, "cpu_bound": bound, "p1": p1,
            "diff_points": diff, "cos": cos, "rss_mb": self_mb, "child_rss_mb": child_mb,
            "threads": threads}


if __name__ == "__main__":
    main()
