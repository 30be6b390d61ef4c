"""Command-line plumbing shared by the entry points: user errors become one clear line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mltrain.errors import MltrainError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )


def run_main(main: Callable[[], object]) -> None:
    """Run `main`; an `MltrainError` (a user mistake) prints without a traceback, exit 2."""
    try:
        main()
    except MltrainError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
