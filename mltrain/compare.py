"""`python -m mltrain.compare`; the command is `mltrain.evaluation.compare`, this path stays
because command lines name it."""

from mltrain.commands.common import run_main
from mltrain.evaluation.compare import main

__all__ = ["main"]

if __name__ == "__main__":
    run_main(main)
