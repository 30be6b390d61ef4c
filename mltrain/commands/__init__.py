"""The command family: `python -m mltrain <command>` (or the `mltrain` script). One module per
command, each with `main(argv)`, a thin argparse layer over library functions a program can
call without it; `train.py`, `evaluate.py` and the `mltrain-search` script are doors to the
same code."""
