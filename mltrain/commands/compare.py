"""Compare pretrained backbones on your data, side by side on the same held-out images.

    python -m mltrain compare --config configs/pooling.yaml
    python -m mltrain compare --config configs/pooling.yaml --backbones resnet50 convnext_tiny \
        --set model.pretrained=true          # any timm names, with network access

Each backbone embeds the config's held-out images untrained; the table has held-out
precision@1, MAP@R, the book score (each image's 4 nearest others by L2, share of its class),
embedding length, parameters, embedding speed and training speed on this machine (a few steps
on random images with the config's trainable_stages; `--train-steps 0` skips it) and where the
weights came from. A backbone with no offline weights under `pretrained: offline` is compared
with random weights (its quality columns then mean nothing; its speeds still hold). The data is
scanned and split once, so every backbone sees the same images. Written to
`<output_dir>/compare/<time>/compare.md` and `compare.json`. The library call is
`mltrain.evaluation.compare.compare`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from mltrain.commands.common import add_config_args, parse_config_args
from mltrain.config import override_key
from mltrain.errors import ConfigError
from mltrain.evaluation.compare import OFFLINE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mltrain compare", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_config_args(p)
    p.add_argument("--backbones", nargs="+", default=OFFLINE, help="timm model names")
    p.add_argument("--out", help="output folder (default <output_dir>/compare/<time>)")
    p.add_argument("--train-steps", type=int, default=3,
                   help="timed training steps per backbone for train img/s (0: skip)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_config_args(parser(), argv)
    for item in args.overrides:  # each backbone replaces it: name them with --backbones
        if override_key(item) == "model.backbone":
            raise ConfigError(f"--set {item}: compare sets model.backbone itself; name the "
                              "networks with --backbones NAME [NAME ...]")  # fmt: skip
    from mltrain.config import check_inference_overrides, load_config
    from mltrain.evaluation.compare import compare, write_comparison

    check_inference_overrides(args.overrides, "compare")
    rows = compare(args.config, args.backbones, args.overrides, args.train_steps)
    base = Path(load_config(args.config, args.overrides).output_dir) / "compare"
    out = Path(args.out) if args.out else base / datetime.now().strftime("%Y%m%d-%H%M%S")
    table = write_comparison(rows, out)
    print(f"{rows[0]['images']} held-out images\n{table}\nwritten to {out}")
