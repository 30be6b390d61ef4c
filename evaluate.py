"""Evaluate embeddings: python evaluate.py --checkpoint CKPT | --backbone NAME --config CFG
(the same as `python -m mltrain evaluate`; see `mltrain/commands/evaluate.py`)."""

from mltrain.commands.common import run_main
from mltrain.commands.evaluate import main

if __name__ == "__main__":
    run_main(main)
