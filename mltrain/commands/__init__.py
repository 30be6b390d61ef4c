"""The command family: `python -m mltrain <command>` (or the `mltrain` script). One module per
command, each with `main(argv)`; `train.py`, `evaluate.py` and `python -m mltrain.search`
stay as thin doors to the same code."""
