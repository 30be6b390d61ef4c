"""Evaluate embeddings: retrieval, per-class, PCA, verification and pictures in TensorBoard.

python -m mltrain evaluate --checkpoint experiments/<run>/checkpoints/best.pt
python -m mltrain evaluate --backbone tf_efficientnet_lite0 --config configs/pooling.yaml
python -m mltrain evaluate --checkpoint RUN_A --checkpoint RUN_B   (an ensemble: each run's
    embedding L2-normalised and concatenated, so similarities are averaged; one split)
(python evaluate.py takes the same arguments)

Results are written to a hidden staging folder beside the target and renamed into place when
complete; --out and --export are checked for writability and free space before evaluating.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from mltrain.commands.common import parse_config_args, run_main
from mltrain.commands.source import add_source_args, embedder_from_args, leave_out_trained
from mltrain.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mltrain evaluate", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_source_args(p)
    p.add_argument("--out", help="output folder (default: <run>/eval/<time>)")
    p.add_argument(
        "--export", metavar="DIR", help="also export a search bundle of the whole folder to DIR"
    )
    p.add_argument("--onnx", action="store_true",
                   help="with --export: also write model.onnx (onnxruntime backend of search)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_config_args(parser(), argv)
    if args.onnx and not args.export:
        raise ConfigError("--onnx needs --export DIR: it adds model.onnx to that bundle")
    if args.onnx:
        from mltrain.inference.onnx import require_onnx

        require_onnx()  # before the evaluation, not after it
    from mltrain.evaluation.evaluate import new_eval_dir

    if args.export and args.checkpoint and len(args.checkpoint) > 1:
        raise ConfigError("--export takes one --checkpoint: a bundle holds one model; "
                          "evaluate the ensemble without --export")  # fmt: skip
    model = embedder_from_args(args, "evaluate", ensemble=True)
    embedder, base, source = model.embedder, model.base, model.text
    out = Path(args.out) if args.out else new_eval_dir(base, create=False)
    export = Path(args.export) if args.export else None
    from mltrain.data.pipeline import prepare_data

    data = prepare_data(embedder.cfg)  # scanned and checked once: checks, evaluation, export
    data = leave_out_trained(model, data)
    check_targets(embedder, out, export, len(data.folder), args.onnx)
    result, out = evaluate_into(embedder, out, source, bool(args.out), base, data)
    m = result.metrics
    ver = m.get("verification") or {}
    print(
        f"precision@1 {m['precision_at_1']:.4f}  MAP@R {m['map_at_r']:.4f}  "
        f"mean per-class P@1 {m['mean_per_class_precision_at_1']:.4f}  "
        + (f"EER {ver['eer']:.4f}  ROC AUC {ver['roc_auc']:.4f}  " if "eer" in ver else "")
        + f"({m['num_queries']} queries, {m['embedding_dim']}-d)"
    )
    if args.export:
        from mltrain.retrieval.export import export_bundle

        export_bundle(embedder, export, source, data=data, rerank=m.get("rerank"),
                      onnx=args.onnx)
        chosen = (m.get("rerank") or {}).get("recommended", "none")
        print(f"exported {len(data.folder)} images to {export}"
              + (f"; search re-ranks with {chosen} by default" if chosen != "none" else ""))
    print(f"results: {out}")


def check_targets(
    embedder, out: Path, export: Path | None, images: int, onnx: bool = False
) -> None:
    """Before the evaluation: the targets may be written (an --out folder holding other
    files is not replaced) and their disks hold a rough upper estimate of the results:
    embeddings (npy and TensorBoard) plus 64 MiB of figures; a bundle's embeddings, index
    and model (twice with `onnx`: model.onnx holds the weights again). The export's index
    settings must fit the `images` it will hold."""
    from mltrain.files import check_output_folders
    from mltrain.retrieval.bundle_write import check_export_target
    from mltrain.retrieval.export import bundle_bytes, check_export_index

    if out.exists() and not (out.is_dir() and (is_eval_dir(out) or not any(out.iterdir()))):
        raise ConfigError(f"--out {out} exists and is not an evaluation folder; choose a new "
                          "folder (an earlier evaluation's folder is replaced whole)")  # fmt: skip
    cfg = embedder.cfg
    dim = embedder.embedding_dim
    if export is not None:
        check_export_target(export)
        check_export_index(cfg.export, images, dim, cfg.eval.metric)
    needs = [(out, "evaluation results (--out)", images * dim * 8 + 64 * 2**20)]
    if export is not None:
        needs.append((export, "search bundle (--export)", bundle_bytes(embedder, images, onnx)))
    check_output_folders(needs, "free space, make the folder writable or choose another one")


def is_eval_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() and (path / "config.yaml").is_file()


def evaluate_into(embedder, out: Path, source: str, replace: bool, base: Path, data) -> tuple:
    """`evaluate` into a staging folder, renamed to `out` when complete: an interrupted or
    failed evaluation leaves nothing at `out`. An --out folder (`replace`) is swapped whole;
    a default `<run>/eval/<time>` that another evaluation took meanwhile gets the next name.
    Returns (EvalResult, the folder it is in)."""
    from mltrain import files
    from mltrain.evaluation.evaluate import evaluate, new_eval_dir

    with files.staging(out, "partial") as tmp:
        result = evaluate(embedder, tmp, source, data)
        while not replace and (out.exists() or out.is_symlink()):
            out = new_eval_dir(base, create=False)
        if replace and out.exists() and not (is_eval_dir(out) or not any(out.iterdir())):
            raise ConfigError(f"--out {out} now holds other files; results not moved there")
        files.replace_dir(tmp, out)
    return result, out


if __name__ == "__main__":
    run_main(main)
