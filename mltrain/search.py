"""`python -m mltrain.search` and the `mltrain-search` script; the command is
`mltrain.retrieval.search`, this path stays because command lines name it."""

import sys

from mltrain.retrieval.search import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
