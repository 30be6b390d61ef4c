"""Train an embedding model: python train.py --config configs/siamese.yaml [--set k=v]
(the same as `python -m mltrain train`; see `mltrain/commands/train.py`)."""

from mltrain.commands.common import run_main
from mltrain.commands.train import main

if __name__ == "__main__":
    run_main(main)
