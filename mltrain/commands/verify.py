"""Are these two images the same class? python -m mltrain verify BUNDLE A B [--far 1e-3]

Prints the similarity under the bundle's model, the threshold calibrated at export for the
false-accept rate (on the bundle's held-out genuine and impostor pairs) and the verdict,
`same` or `different`. Exit 0 either way; 2 for a bad bundle, image or FAR. A threshold
that too few impostor pairs back to resolve its FAR gets a note on stderr: it is approximate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mltrain.errors import check_number
from mltrain.text import printable


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mltrain verify", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("bundle", help="search bundle folder")
    p.add_argument("a", help="first image")
    p.add_argument("b", help="second image")
    p.add_argument("--far", type=float, default=1e-3, help="false-accept rate (default 1e-3)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_number("--far", args.far, 0, 1, low_open=True, high_open=True,
                 what="a false-accept rate, e.g. 1e-3")  # fmt: skip
    from mltrain.retrieval.bundle import load_bundle
    from mltrain.retrieval.verify import calibration_note, check_pair_paths, verify_pair

    check_pair_paths(args.a, args.b)  # a mistyped path fails before the bundle is read
    r = verify_pair(load_bundle(args.bundle), args.a, args.b, args.far)
    if note := calibration_note(r):
        print(f"note: {note}", file=sys.stderr)
    print(
        f"{printable(args.a)} vs {printable(args.b)}: similarity {r['similarity']:.4f}, "
        f"threshold {r['threshold']:.4f} (FAR {r['far']:g} on {r['impostor_pairs']} "
        f"{r['rows']} impostor pairs, TAR {r['tar']:.3f}): "
        f"{'same' if r['same'] else 'different'}"
    )
