"""Train an embedding model: python train.py --config configs/siamese.yaml [--set k=v]."""

import argparse

from mltrain.cli import add_config_args, run_main
from mltrain.config import load_config
from mltrain.errors import ConfigError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_args(parser)
    parser.add_argument("--resume", help="run folder or checkpoint to continue exactly")
    args = parser.parse_args()
    from mltrain.trainer import fit  # heavy imports after argument errors

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes its config from the checkpoint; drop --config")
        run_dir = fit(resume=args.resume, overrides=args.overrides)
    else:
        run_dir = fit(load_config(args.config, args.overrides))
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    run_main(main)
