"""`python -m mltrain <command>` and the `mltrain` script: one family of commands with shared
flags (`--config`, `--set`, `--checkpoint`, `--backbone`) and one-line errors. Command NAME is
the module `mltrain.commands.NAME`, and only the chosen one is imported, so `mltrain verify`
does not pay for training's imports. The exit status is the command's own (search: 1 when
some query failed), 2 for a failure (search: when no query was answered), 130 for Ctrl-C."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from mltrain.commands.common import run_main

COMMANDS = {
    "train": "train a model from a config (train.py)",
    "evaluate": "evaluate a checkpoint or backbone (evaluate.py)",
    "export": "embed a folder into a search bundle, no evaluation",
    "search": "search a bundle with query images",
    "add": "enroll images (one per class is enough) into a bundle",
    "verify": "same class or not, at a calibrated threshold",
    "serve": "serve a bundle over HTTP: search API and web page",
    "compare": "compare pretrained backbones on your data",
    "download": "fetch a public data set into a folder layout (needs network)",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
    return f"usage: python -m mltrain <command> [args]   (<command> -h for its help)\n\n{rows}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mltrain.commands.{name}")
    return run_main(lambda: module.main(rest))


def entry() -> None:
    """The `mltrain` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
