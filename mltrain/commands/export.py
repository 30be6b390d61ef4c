"""Export a search bundle with no evaluation: embed the config's image folder at embedding
speed, build the index, calibrate the verification thresholds on the held-out rows, write.

python -m mltrain export --checkpoint CKPT --out DIR [--onnx]
python -m mltrain export --backbone NAME --config CFG [--set k=v ...] --out DIR [--onnx]

--ray [ADDRESS] embeds on a pool of Ray actors (a local Ray, or a cluster; docs/scale.md) and
writes the same bundle; needs the ray extra.

--onnx also writes model.onnx (fp32, checked against PyTorch on gallery images before any
image is embedded) for `search --backend onnx`; needs the onnx extra.

The target, its free space and the index settings are checked before any image is embedded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mltrain.commands.common import parse_config_args
from mltrain.commands.ray_args import add_ray_args, ray_options
from mltrain.commands.source import add_source_args, embedder_from_args, leave_out_trained

if TYPE_CHECKING:
    from mltrain.inference.ray_start import RayOptions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mltrain export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_source_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (for search --backend onnx)")
    add_ray_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_config_args(parser(), argv)
    ray = ray_options(args)  # Ray installed, its address reachable: before the model is built
    if args.onnx:
        from mltrain.inference.onnx import require_onnx

        require_onnx()  # before the model is built
    from mltrain.inference.ray_start import MODEL_IMPORTS, ray_started_early

    # --ray: a local Ray starts while torch and what writes the bundle are imported
    with ray_started_early(ray, (*MODEL_IMPORTS, "mltrain.retrieval.export")):
        _export(args, ray)


def _export(args: argparse.Namespace, ray: RayOptions | None) -> None:
    from mltrain.data.pipeline import prepare_data
    from mltrain.files import check_output_folders
    from mltrain.inference.ray_embed import on_ray
    from mltrain.retrieval.bundle_write import check_export_target, clean_stale
    from mltrain.retrieval.export import bundle_bytes, check_export_index, export_bundle

    clean_stale(Path(args.out))  # a killed writer's folders go, even if this export fails
    model = embedder_from_args(args, "export")
    embedder, cfg, out = model.embedder, model.embedder.cfg, Path(args.out)
    check_export_target(out)
    data = prepare_data(cfg, duplicates=False)  # no held-out figures to inflate here
    data = leave_out_trained(model, data)  # its thresholds are calibrated on held-out rows
    n, dim = len(data.folder), embedder.model.embedding_dim
    check_export_index(cfg.export, n, dim, cfg.eval.metric)
    check_output_folders([(out, "search bundle (--out)", bundle_bytes(embedder, n, args.onnx))],
                         "free space, make the folder writable or choose another one")  # fmt: skip
    start = time.perf_counter()
    with on_ray(embedder, ray) as embedding:
        export_bundle(embedding, out, model.text, data=data, onnx=args.onnx)
    took = time.perf_counter() - start
    print(f"exported {n} images in {took:.1f} s ({n / took:.1f} img/s): {out}")
