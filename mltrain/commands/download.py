"""`python -m mltrain download caltech101 DEST`: fetch a public data set into a folder
layout training reads (needs network; everything else in mltrain runs offline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mltrain.data.download import DATASETS


def main(argv: list[str] | None = None) -> None:
    """Download a data set; a failed download is one line (exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m mltrain download", description=__doc__)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("dest", type=Path, help="folder to download into")
    args = parser.parse_args(argv)
    root = DATASETS[args.dataset](args.dest)
    print(f"{args.dataset} is in {root}; set data.root: {root}")
