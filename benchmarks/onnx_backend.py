"""PyTorch against onnxruntime for embedding: which backend should `search --backend auto` use?

    python benchmarks/onnx_backend.py [--images 128] [--rounds 2] [--runs 3] [--root PATH]

On the same N real images (Caltech101 through the configs' data root, spread evenly over the
classes; `--root` for another folder), with the pooling config's model (tf_efficientnet_lite0,
offline ImageNet weights):

- model only, on decoded tensors, batch 1 and batch 32: the PyTorch path as `search` runs it
  (BatchNorm folded, channels_last, bf16 autocast where the CPU has it, chunks of
  `eval.cpu_chunk`), the same with `eval.amp=off` (fp32, what a CPU without bf16 runs), and
  onnxruntime fp32 on the exported graph (intra-op threads = torch's);
- end to end, `Embedder.embed(paths)` (decode + model, loader workers running the model)
  through each backend;
- whole processes: `python -m mltrain search BUNDLE IMAGE --backend torch` against
  `--backend onnx` on a bundle of `--gallery` of the images exported with `--onnx`
  (start-up, imports, bundle check, model build, one query).

A second table puts OpenVINO (bf16 where the CPU has it, fp32 otherwise; `openvino` extra)
beside them, and gives each runner's setup beyond the PyTorch model: folding BatchNorm (torch),
building the session (onnxruntime), compiling and checking parity (OpenVINO, from the graph and
from a trace of the model), each with its first batch of one. These feed
`mltrain.inference.backends.COSTS`, from which `--backend auto` chooses.

Rows run interleaved in `--rounds` rounds after an untimed warm-up; every figure is also a
ratio to the PyTorch default measured in the same process, and the load average is printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/onnx_backend.py`
    import common  # type: ignore[no-redef]

import torch  # noqa: E402

from mltrain.config import load_config  # noqa: E402
from mltrain.inference.batching import _embed_fn, apply  # noqa: E402
from mltrain.inference.embedder import Embedder, embedder_from_backbone  # noqa: E402
from mltrain.inference.onnx import OnnxSession, export_checked, noise_probe  # noqa: E402
from mltrain.inference.openvino import checked_runner, openvino_available  # noqa: E402
from mltrain.retrieval.export import export_bundle  # noqa: E402


def model_rate(embedder: Embedder, x: torch.Tensor, batch: int):
    """A round function for `common.run_rounds`: embed `x` in batches of `batch` through
    the embedder's forward model and spec, as `Embedder.embed` does after decoding."""
    fn = _embed_fn(embedder.forward_model, False)

    def run(_: int) -> int:
        with torch.inference_mode():
            for s in range(0, len(x), batch):
                apply(fn, x[s : s + batch], embedder.spec)
        return len(x)

    return run


def link_subset(paths: list[Path], root: Path, work: Path) -> Path:
    """A class-per-folder tree of links to `paths` (the search bundle's gallery)."""
    out = work / "gallery"
    for p in paths:
        dest = out / p.relative_to(root).parent / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(p.resolve())
    return out


def process_seconds(bundle: Path, query: Path, backend: str) -> float:
    cmd = [sys.executable, "-m", "mltrain", "search", str(bundle), str(query), "-k", "3",
           "--backend", backend]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(common.REPO)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=common.REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128,
                        help="images sampled evenly over the classes")
    parser.add_argument("--rounds", type=int, default=2, help="interleaving rounds")
    parser.add_argument("--runs", type=int, default=3, help="search processes per backend")
    parser.add_argument("--gallery", type=int, default=64, help="images in the search bundle")
    common.add_threads_arg(parser)
    common.add_model_args(parser)
    args = parser.parse_args(argv)
    threads = common.apply_threads(args.threads)

    overrides = [*common.model_overrides(args), "eval.backend=torch"]
    root = common.data_root(args.root, load_config(common.CONFIGS / "pooling.yaml", overrides))
    cfg = common.config_for("pooling", root, overrides)
    folder = common.scan(cfg)
    paths = [folder.paths[i] for i in common.sample_evenly(folder, args.images)]

    default = embedder_from_backbone(cfg)
    fp32_cfg = copy.deepcopy(cfg)
    fp32_cfg.eval.amp = "off"
    fp32 = embedder_from_backbone(fp32_cfg)
    fp32.model.load_state_dict(default.model.state_dict())
    x = torch.cat([b for b, _, _ in default._loader(paths, None)])
    t0 = time.perf_counter()
    graph, parity = export_checked(default.model, x[:8], "gallery")
    export_s = time.perf_counter() - t0
    onnx = default.with_backend("onnx", OnnxSession(graph, default.model.normalize))
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[default.amp]

    print(f"# onnx benchmark: {len(paths)} images from {root}, {cfg.model.backbone} "
          f"(pretrained={cfg.model.pretrained}), input {tuple(default.dcfg['input_size'])}, "
          f"torch threads {threads} (onnxruntime intra-op threads the same)")
    print(f"export {export_s:.1f} s, {len(graph) / 2**20:.1f} MiB; parity worst cosine "
          f"{parity.worst_cosine:.7f} on {parity.probe_images} images")
    print(common.load_note())

    small = x[: min(len(x), 32)]
    variants = {
        f"torch {amp} (search default), batch 1": model_rate(default, small, 1),
        "torch fp32 (eval.amp=off), batch 1": model_rate(fp32, small, 1),
        "onnxruntime fp32, batch 1": model_rate(onnx, small, 1),
        f"torch {amp} (search default), batch 32": model_rate(default, x, 32),
        "torch fp32 (eval.amp=off), batch 32": model_rate(fp32, x, 32),
        "onnxruntime fp32, batch 32": model_rate(onnx, x, 32),
        f"embed() end to end, torch {amp}": lambda _: len(default.embed(paths)),
        "embed() end to end, onnxruntime": lambda _: len(onnx.embed(paths)),
    }
    for run in variants.values():  # warm-up, untimed
        run(-1)
    times: dict[str, float] = {}
    counts: dict[str, int] = {}
    setup, extra = runner_setup(default, graph, x)
    if "openvino" in extra:
        ov = extra["openvino"]
        variants["openvino, batch 1"] = model_rate(ov, small, 1)
        variants["openvino, batch 32"] = model_rate(ov, x, 32)
        variants["openvino, embed() end to end"] = lambda _: len(ov.embed(paths))
        variants["openvino, batch 1"](-1)
        variants["openvino, embed() end to end"](-1)
    common.run_rounds(variants, max(1, args.rounds), times, counts)
    rate = {k: counts[k] / times[k] for k in variants}
    names = list(variants)[:8]
    base = {n: names[0] if "batch 1" in n else names[3] if "batch 32" in n else names[6]
            for n in names}  # fmt: skip
    rows = [[n, counts[n], times[n], rate[n], rate[n] / rate[base[n]]] for n in names]

    work = Path(tempfile.mkdtemp(prefix="mltrain-onnx-bench-"))
    gallery = link_subset(paths[: max(args.gallery, 1)], root, work)
    bcfg = copy.deepcopy(cfg)
    bcfg.data.root, bcfg.data.split = str(gallery), "none"
    bcfg.export.index = "flat"
    bundle = export_bundle(replace(default, cfg=bcfg), work / "bundle",
                           "benchmarks/onnx_backend.py", onnx=True)
    proc: dict[str, list[float]] = {b: [] for b in ("torch", "onnx", *extra)}
    for r in range(max(1, args.runs)):
        for backend in common.interleaved_order(list(proc), r):
            proc[backend].append(process_seconds(bundle, paths[-1], backend))
    med = {k: statistics.median(v) for k, v in proc.items()}
    for k in ("torch", "onnx"):
        label = f"process: mltrain search BUNDLE IMG --backend {k}"
        rows.append([label, len(proc[k]), sum(proc[k]), len(proc[k]) / sum(proc[k]),
                     med["torch"] / med[k]])  # fmt: skip

    print()
    print(common.markdown_table(["variant", "images", "seconds", "img/s", "ratio"], rows))
    print(f"(ratio: against the torch {amp} row of the same group, higher is faster; process "
          f"rows: images = runs, img/s = searches/s, ratio of median seconds "
          f"{med['torch']:.2f} torch / {med['onnx']:.2f} onnx)")
    print(f"{common.load_note()}")
    print_runners(names, rate, setup, med, amp)
    return {"setup": setup, "rate": rate, "process": med,
            "parity": parity.worst_cosine, "names": names,
            "threads": threads, "bundle": bundle}  # fmt: skip


def runner_setup(default: Embedder, graph: bytes, x: torch.Tensor) -> tuple[dict, dict]:
    """({runner: setup seconds}, {"openvino": its embedder} where openvino is installed):
    what each runner costs before its first embedding, the first batch of one included."""
    setup: dict[str, float] = {}
    one = x[:1]
    fresh = replace(default, _fast=None, _on={})
    with common.stopwatch(setup, "torch"):
        model_rate(fresh, one, 1)(0)
    with common.stopwatch(setup, "onnx"):
        model_rate(default.with_backend("onnx", OnnxSession(graph, default.model.normalize)),
                   one, 1)(0)  # fmt: skip
    extra = {}
    if openvino_available():
        probe = noise_probe(tuple(default.dcfg["input_size"]), 4)
        for key, source in (("openvino", graph), ("openvino, traced", None)):
            with common.stopwatch(setup, key):
                runner, _ = checked_runner(default.model, probe, source)
                ov = replace(default, backend="openvino", openvino=runner, _on={})
                model_rate(ov, one, 1)(0)
        extra["openvino"] = ov
    return setup, extra


def print_runners(names: list[str], rate: dict, setup: dict, med: dict, amp: str) -> None:
    """Every runner's setup and speed, as ratios to the torch default."""
    torch_1, torch_32, torch_e2e = names[0], names[3], names[6]
    keys = {"torch": (torch_1, torch_32, torch_e2e),
            "onnx": (names[2], names[5], names[7]),
            "openvino": ("openvino, batch 1", "openvino, batch 32",
                         "openvino, embed() end to end")}  # fmt: skip
    rows = []
    for runner, (b1, b32, e2e) in keys.items():
        if b1 not in rate:
            continue
        rows.append([runner, setup[runner], rate[b1], rate[b1] / rate[torch_1], rate[b32],
                     rate[b32] / rate[torch_32], rate[e2e] / rate[torch_e2e],
                     med.get(runner, float("nan"))])  # fmt: skip
    if "openvino, traced" in setup:
        rows.append(["openvino, traced (no model.onnx)", setup["openvino, traced"]]
                    + [float("nan")] * 6)
    print()
    print(common.markdown_table(
        ["runner", "setup s", "batch 1 img/s", "ratio", "batch 32 img/s", "ratio",
         "end to end ratio", "search process median s"], rows))
    print(f"(ratios against torch {amp}, the search default's PyTorch path; setup: beyond the "
          "PyTorch model, first batch of one included)")
    print(common.load_note())


if __name__ == "__main__":
    main()
