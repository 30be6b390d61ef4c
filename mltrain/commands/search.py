"""Reverse image search with an exported bundle.

  python -m mltrain search BUNDLE IMAGE... [-k 5] [--sheet out.png] [--json]
  (installed as the console script `mltrain-search`, same arguments; `mltrain-search --add
  BUNDLE FOLDER_OR_IMAGE... [--class NAME]` is `python -m mltrain add`)

Loads and validates the bundle (no index is rebuilt, nothing in it is re-embedded), embeds
the query images with the bundle's own model and prints, per query, the ranked neighbours:
rank, score, class and path (relative to the image root). Scores are cosine similarities
(higher is closer) for cosine bundles, squared L2 distances (lower is closer) for l2 bundles.
Per query it prints the search time in microseconds (the index call, or the exact scoring
of a --class filter, after one warm-up search) and once the time spent embedding the queries.

  -k N          neighbours per query (default: the bundle's export.k)
  --sheet PNG   contact sheet: each query beside its top-k thumbnails with class names;
                results are outlined green when their class is the one the query's folders
                name (Latin/character07/q.png: Latin/character07 in a nested bundle), red
                when it differs, grey when they name no class of the bundle
  --json        one JSON document on stdout instead of the table
  --image-root  where the bundle's images are now, if they moved (thumbnails only)
  --backend B   what embeds the queries: torch, onnx (the bundle's model.onnx, written by
                `export --onnx`, run by onnxruntime fp32), openvino (the openvino extra) or
                auto (default: the runner with the least measured time for this many
                queries; see `choose_backend`)

An unreadable query prints an error line naming it and the other queries still run.
Exit code 0: every query answered; 1: some query failed; 2: unusable bundle or arguments,
or a file that cannot be written; 130: interrupted (Ctrl-C or SIGTERM). Class names and paths
from the bundle are printed with control characters escaped. The library calls are
`mltrain.retrieval.search.search_images` and `mltrain.retrieval.sheet.write_sheet`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mltrain.commands.add import enroll
from mltrain.commands.common import exit_status
from mltrain.errors import ConfigError
from mltrain.inference.backends import BACKENDS
from mltrain.retrieval.rerank import RERANKERS
from mltrain.text import printable, shortened

if TYPE_CHECKING:  # the bundle, the model and Faiss load after the arguments are checked
    from mltrain.retrieval.bundle import Bundle
    from mltrain.retrieval.search import SearchRun

CLASS_COLUMN = 40  # the table's class column; --json keeps every name whole


def parser(prog: str = "mltrain search") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("bundle", help="search bundle folder (written by python -m mltrain export)")
    p.add_argument("images", nargs="+", help="query images (with --add: images or folders)")
    p.add_argument("-k", type=int, default=None, help="neighbours per query")
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet to this file")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--image-root", help="the bundle's images are now here (thumbnails)")
    p.add_argument("--add", action="store_true", help="add the images to the bundle instead")
    p.add_argument("--class", dest="class_name",
                   help="a search: hits of this class only; with --add: class of every new image")
    p.add_argument("--rerank", default="auto", choices=("auto", *RERANKERS),
                   help="re-order the top candidates: k_reciprocal or alpha_qe; auto (default): "
                        "what the evaluation that exported the bundle found helps, else none")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="embed queries with torch, onnx (the bundle's model.onnx, from "
                        "export --onnx) or openvino; auto (default): the runner with the least "
                        "measured time for this many queries")
    p.add_argument("--threshold", metavar="auto|T",
                   help="mark hits as match / no match at this similarity; auto: the bundle's "
                        "calibrated threshold at FAR 1e-3; 'unknown' when the best hit is below")
    return p


def search_only_flags(args: argparse.Namespace) -> list[str]:
    """Search flags given with `--add` (which searches nothing), so none is silently ignored."""
    given = {"-k": args.k is not None, "--sheet": args.sheet, "--json": args.json,
             "--threshold": args.threshold is not None, "--image-root": args.image_root,
             "--rerank": args.rerank != "auto", "--backend": args.backend != "auto"}  # fmt: skip
    return [flag for flag, on in given.items() if on]


def main(argv: Sequence[str] | None = None, prog: str = "mltrain search") -> int:
    """`mltrain search`: 0 when every query was answered, 1 when some query failed (each
    named on stderr), 2 when none was answered; a bad bundle or argument raises, for
    `run_main` to print."""
    args = parser(prog).parse_args(argv)
    if args.add:
        ignored = search_only_flags(args)
        if ignored:
            verb = "applies" if len(ignored) == 1 else "apply"
            raise ConfigError(f"{', '.join(ignored)} only {verb} to a search, not with --add")
        enroll(args.bundle, args.images, args.class_name)
        return 0
    if args.k is not None and args.k < 1:
        raise ConfigError(f"-k must be at least 1, got {args.k}")
    # the bundle, its model and Faiss import only now: -h and a bad argument answer at once
    from mltrain.retrieval.bundle import load_bundle
    from mltrain.retrieval.gallery import label_of
    from mltrain.retrieval.search import (
        apply_threshold,
        default_rerank,
        search_images,
        threshold_value,
    )
    from mltrain.retrieval.sheet import check_sheet_target, write_sheet

    if args.sheet:
        check_sheet_target(args.sheet)
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle, args.image_root)
    load_ms = (time.perf_counter() - t0) * 1e3
    k = args.k if args.k is not None else int(bundle.manifest["config"]["export"]["k"])
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")
    if k > len(bundle):
        print(f"note: -k {k} exceeds the bundle's {len(bundle)} images; using {len(bundle)}",
              file=sys.stderr)  # fmt: skip
    threshold, cal = (None, None) if args.threshold is None else threshold_value(
        bundle, args.threshold)  # fmt: skip
    label = label_of(bundle.classes, args.class_name)
    run = search_images(bundle, args.images, k, default_rerank(bundle, args.rerank),
                        args.backend, label)  # fmt: skip
    if threshold is not None:
        apply_threshold(run, threshold)
    report(run, bundle, args.json, load_ms, threshold, cal)
    if args.sheet:
        out = write_sheet(run, bundle, args.sheet)
        print(f"contact sheet: {printable(out)}", file=sys.stderr if args.json else sys.stdout)
    failed = sum(r.error is not None for r in run.results)
    return 2 if failed == len(run.results) else 1 if failed else 0  # 2: nothing was answered


def report(run: SearchRun, bundle: Bundle, as_json: bool, load_ms: float,
           threshold: float | None, cal: dict[str, Any] | None) -> None:  # fmt: skip
    """Failed queries and a loose threshold on stderr; the answer on stdout, as one JSON
    document or as a header and a table per query."""
    from mltrain.retrieval.verify import calibration_note, is_resolved

    for r in run.results:
        if r.error is not None:
            print(f"error: query {printable(r.query)}: {printable(r.error)}", file=sys.stderr)
    if cal is not None and (note := calibration_note(cal)):
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        doc = json_doc(run, bundle, load_ms)
        if threshold is not None:
            doc["threshold"] = threshold
            if cal is not None:
                doc["threshold_resolved"] = is_resolved(cal)
        print(json.dumps(doc, indent=2))
        return
    info = bundle.manifest["index"]
    pca = f", PCA {printable(info['pca_dim'])}" if info.get("pca_dim") else ""
    print(f"bundle {printable(bundle.path)}: {len(bundle)} images, "
          f"{printable(info['kind'])} index{pca}, {printable(bundle.metric)} metric; "
          f"loaded and verified in {load_ms:.0f} ms"
          + (f"; re-ranked with {run.rerank}, so the hits follow its order and each "
             f"score stays the plain {printable(bundle.metric)} one"
             if run.rerank != "none" else ""))  # fmt: skip
    if threshold is not None:
        how = f" (calibrated at FAR {cal['far']:g})" if cal is not None else ""
        print(f"threshold {threshold:.4f}{how}: a hit at or above it is a match")
    print_table(run, bundle)


def print_table(run: SearchRun, bundle: Bundle) -> None:
    """Per answered query its ranked hits, then one line of timings."""
    score_name = "cosine" if bundle.metric == "cosine" else "sq.L2"
    for r in run.results:
        if r.error is not None:
            continue
        print(f"\nquery {printable(r.query)}  (index search {r.search_us:.0f} us)")
        names = [shortened(printable(h.cls), CLASS_COLUMN) for h in r.hits]
        width = max([5, *map(len, names)])
        print(f"  {'rank':>4}  {score_name:>8}  {'class':<{width}}  path")
        for h, name in zip(r.hits, names, strict=True):
            mark = "" if h.match is None else ("  match" if h.match else "  no match")
            print(f"  {h.rank:>4}  {h.score:>8.4f}  {name:<{width}}  "
                  f"{printable(h.path)}{mark}")  # fmt: skip
        if r.answer is not None:
            print(f"  answer: {printable(r.answer)}")
    n_ok = sum(r.error is None for r in run.results)
    if not n_ok:
        print("\nno query could be searched (see the errors above)")
        return
    per = run.embed_ms / n_ok
    us = [r.search_us for r in run.results if r.search_us is not None]
    med = f"{float(np.median(us)):.0f} us median" if us else "no searches"
    print(
        f"\nembedded {n_ok} of {len(run.results)} queries in {run.embed_ms:.1f} ms "
        f"({per:.1f} ms per image with {run.backend}; model rebuilt in {run.model_ms:.0f} ms); "
        f"index search {med}"
    )


def json_doc(run: SearchRun, bundle: Bundle, load_ms: float) -> dict[str, Any]:
    """The --json answer: the bundle's index, the settings that ran and every query's hits."""
    from mltrain.retrieval.search import hit_dict

    info = bundle.manifest["index"]
    return {
        "bundle": str(bundle.path),
        "metric": bundle.metric,
        "index": {"kind": info["kind"], "pca_dim": info.get("pca_dim"), "ntotal": len(bundle)},
        "k": run.k,
        "rerank": run.rerank,
        "backend": run.backend,
        "timing": {"load_ms": load_ms, "model_ms": run.model_ms, "embed_ms": run.embed_ms},
        "queries": [
            {
                "query": r.query,
                "error": r.error,
                "search_us": r.search_us,
                "answer": r.answer,
                "results": [hit_dict(h) for h in r.hits],
            }
            for r in run.results
        ],
    }


def script(argv: Sequence[str] | None = None) -> int:
    """The `mltrain-search` console script: the exit status, failures as one line."""
    return exit_status(lambda: main(argv, prog="mltrain-search"))
