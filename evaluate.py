"""Evaluate embeddings: retrieval, per-class, PCA, verification and pictures in TensorBoard.

python evaluate.py --checkpoint experiments/<run>/checkpoints/best.pt
python evaluate.py --backbone tf_efficientnet_lite0 --config configs/pooling.yaml
"""

import argparse
from pathlib import Path

from mltrain.cli import add_config_args, run_main
from mltrain.errors import ConfigError


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--checkpoint", help="a training checkpoint (.pt) or run folder")
    parser.add_argument("--backbone", help="evaluate this pretrained timm backbone, untrained")
    parser.add_argument("--out", help="output folder (default: <run>/eval/<time>)")
    parser.add_argument(
        "--export",
        metavar="DIR",
        help="also export a search bundle of the whole image folder to DIR",
    )
    args = parser.parse_args()
    if bool(args.checkpoint) == bool(args.backbone):
        raise ConfigError("give exactly one of --checkpoint or --backbone")
    from mltrain.config import load_config
    from mltrain.evaluation import evaluate, new_eval_dir
    from mltrain.inference import embedder_from_backbone, embedder_from_checkpoint

    if args.checkpoint:
        if args.config:
            raise ConfigError("--checkpoint carries its own config; use --set to change it")
        embedder = embedder_from_checkpoint(args.checkpoint, args.overrides)
        ckpt = Path(args.checkpoint)
        base = ckpt if ckpt.is_dir() else ckpt.resolve().parent.parent
        source = f"checkpoint {args.checkpoint}"
    else:
        cfg = load_config(args.config, [f"model.backbone={args.backbone}", *args.overrides])
        embedder = embedder_from_backbone(cfg)
        base = Path(cfg.output_dir) / f"backbone-{args.backbone}"
        source = f"pretrained backbone {args.backbone}"
    out = Path(args.out) if args.out else new_eval_dir(base)
    out.mkdir(parents=True, exist_ok=True)
    from mltrain.config import save_config
    from mltrain.rundata import prepare_data

    save_config(embedder.cfg, out / "config.yaml")
    data = prepare_data(embedder.cfg, out)  # scanned and checked once, for both
    if args.export:  # its size checks before any embedding, not after the evaluation
        from mltrain.bundle import check_export_index

        cfg = embedder.cfg
        dim = embedder.model.embedding_dim
        check_export_index(cfg.export, len(data.folder), dim, cfg.eval.metric)
    result = evaluate(embedder, out, source, data)
    m = result.metrics
    print(
        f"precision@1 {m['precision_at_1']:.4f}  MAP@R {m['map_at_r']:.4f}  "
        f"mean per-class P@1 {m['mean_per_class_precision_at_1']:.4f}  "
        f"({m['num_queries']} queries, {m['embedding_dim']}-d)"
    )
    if args.export:
        from mltrain.bundle import export_bundle

        export_bundle(embedder, Path(args.export), source, data=data)
    print(f"results: {out}")


if __name__ == "__main__":
    run_main(main)
