"""Reverse image search with an exported bundle (see `mltrain.retrieval.bundle`).

  python -m mltrain.retrieval.search BUNDLE IMAGE... [-k 5] [--sheet out.png] [--json]
  python -m mltrain.retrieval.search --add BUNDLE FOLDER_OR_IMAGE... [--class NAME]
  (installed as the console script `mltrain-search`, same arguments)

Search: loads and validates the bundle (no index is rebuilt, nothing in it is re-embedded),
embeds the query images with the bundle's own model and prints, per query, the ranked
neighbours: rank, score, class and path (relative to the image root). Scores are cosine
similarities (higher is closer) for cosine bundles, squared L2 distances (lower is closer)
for l2 bundles. Per query it prints the index search time in microseconds (the Faiss call
alone, after one warm-up search) and once the time spent embedding the queries.

  -k N          neighbours per query (default: the bundle's export.k)
  --sheet PNG   contact sheet: each query beside its top-k thumbnails with class names;
                results are outlined green when their class equals the query's folder name,
                red when it differs, grey when the query's folder is no class of the bundle
  --json        one JSON document on stdout instead of the table
  --image-root  where the bundle's images are now, if they moved (thumbnails only)
  --backend B   what embeds the queries: torch, onnx (the bundle's model.onnx, written by
                `export --onnx`, run by onnxruntime fp32) or auto (default: onnx where the
                bundle has it, 1.5-4x faster per query here; see `choose_backend`)

An unreadable query prints an error line naming it and the other queries still run.
Exit code 0: every query answered; 1: some query failed; 2: unusable bundle or arguments,
or a file that cannot be written; 130: interrupted (Ctrl-C or SIGTERM). Class names and paths
from the bundle are printed with control characters escaped.

Add (`--add`): embeds only the new images with the bundle's model and appends them to its
embeddings, metadata and index (approximate indexes are added to, not retrained). A folder
with class sub-folders adds each sub-folder as a class; otherwise an image's class is its
parent folder's name, or NAME from `--class`. Images outside the bundle's image root are
copied into BUNDLE/images/. The updated bundle replaces the old one in a single rename.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mltrain import files
from mltrain.commands.common import INTERRUPTED, INTERRUPTED_LINE, term_as_interrupt
from mltrain.data.images import load_image
from mltrain.errors import ConfigError, MltrainError
from mltrain.files import check_writable
from mltrain.inference.embedder import Embedder
from mltrain.retrieval.add import add_images
from mltrain.retrieval.bundle import (
    BACKENDS,
    Bundle,
    bundle_embedder,
    choose_backend,
    load_bundle,
    safe_image_path,
)
from mltrain.retrieval.index import (
    l2_normalize,
    prepare,
    timed_single_queries,
)
from mltrain.retrieval.rerank import RERANKERS, rerank_candidates
from mltrain.retrieval.verify import calibration_note, is_resolved, threshold_for
from mltrain.text import counted, error_line, printable, shortened


@dataclass
class Hit:
    rank: int
    score: float
    row: int  # row of the bundle's embeddings / metadata
    cls: str
    path: str
    match: bool | None = None  # with a threshold: the score reaches it


@dataclass
class QueryResult:
    query: str
    error: str | None = None
    search_us: float | None = None
    hits: list[Hit] = field(default_factory=list)
    answer: str | None = None  # with a threshold: the top hit's class, or "unknown"


@dataclass
class SearchRun:
    results: list[QueryResult]
    k: int
    embed_ms: float  # embedding all readable queries, model already built
    model_ms: float  # rebuilding the model from the bundle
    rerank: str = "none"  # the re-ranker that ordered the hits
    backend: str = "torch"  # what embedded the queries


def query_problem(path: Path) -> str | None:
    """What makes `path` no query image before anything reads it (it is missing, or a
    folder), as the end of a sentence that names it; None for a file. The data check's
    advice for an unreadable image in a training folder does not fit a mistyped query."""
    try:
        if path.is_dir():
            return "is a folder; pass image files"
        path.stat()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return "does not exist; check the path"
    return None  # other failures (permissions, not an image) come from decoding it


def _readable_queries(paths: list[Path], results: list[QueryResult]) -> list[int]:
    """Positions of the queries that exist as files; the others get their error now."""
    ok = []
    for i, p in enumerate(paths):
        problem = query_problem(p)
        if problem:
            results[i].error = problem
        else:
            ok.append(i)
    return ok


def _embed_queries(embedder: Embedder, paths: list[Path], results: list[QueryResult],
                   candidates: list[int]) -> dict[int, np.ndarray]:  # fmt: skip
    """Embeddings of the readable `candidates`; unreadable ones get an error instead."""
    ok: list[int] = []
    for i in candidates:
        try:
            load_image(paths[i], 64)
            ok.append(i)
        except MltrainError as e:
            results[i].error = str(e)
    embs: dict[int, np.ndarray] = {}
    if not ok:
        return embs
    try:
        batch = embedder.embed([paths[i] for i in ok], desc="embedding queries")
        embs = {i: batch[j] for j, i in enumerate(ok)}
    except MltrainError:  # e.g. an image that decodes but fails the transform: one by one
        for i in ok:
            try:
                embs[i] = embedder.embed([paths[i]], desc="embedding query")[0]
            except MltrainError as e:
                results[i].error = str(e)
    return embs


def search_images(
    bundle: Bundle,
    paths: Sequence[str | Path],
    k: int,
    rerank: str = "none",
    backend: str = "auto",
    label: int | None = None,
) -> SearchRun:
    """Embed `paths` with the bundle's model and search its gallery, one query per call.

    `backend` runs the model with torch or onnxruntime (see `choose_backend`); `label`
    limits the hits to that class (`gallery.label_of` turns a class name into it).

    With `rerank` (see `mltrain.retrieval.rerank`) the index returns max(4k, 50) candidates,
    which are re-ordered with their stored embeddings, and the first k are kept; the timed
    search is the index call alone. Scores are the index's, except a PCA bundle's: its
    max(4k, 50) candidates are scored again at full length (`exact_scores`)."""
    paths = [Path(p) for p in paths]
    results = [QueryResult(str(p)) for p in paths]
    gallery, metric = bundle.gallery, bundle.metric
    gallery.check_metric(metric)
    k = max(1, min(k, gallery.count()))
    candidates = _readable_queries(paths, results)
    if not candidates:  # every query is missing or a folder: no model to build
        return SearchRun(results, k, 0.0, 0.0, rerank, choose_backend(bundle, backend))
    t0 = time.perf_counter()
    embedder = bundle_embedder(bundle, backend)
    model_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    embs = _embed_queries(embedder, paths, results, candidates)
    embed_ms = (time.perf_counter() - t0) * 1e3
    deep = search_depth(bundle, k, rerank)
    order = list(embs)
    queries = (np.concatenate([prepare(embs[i][None, :], metric, "query") for i in order])
               if order else np.empty((0, gallery.dim), np.float32))  # fmt: skip
    timed = timed_single_queries(lambda q: gallery.search(q, deep, label), queries)
    for n, (i, (seconds, (scores, rows))) in enumerate(zip(order, timed, strict=True)):
        results[i].search_us = seconds * 1e6
        results[i].hits = rank_hits(bundle, queries[n], scores[0], rows[0], k, rerank)
    return SearchRun(results, k, embed_ms, model_ms, rerank, embedder.backend)


def search_depth(bundle: Bundle, k: int, rerank: str) -> int:
    """How many candidates the index returns for k hits: k, or max(4k, 50) to re-rank or
    to re-score a PCA bundle's (whose reduced space may rank a true neighbour below k)."""
    n = bundle.gallery.count()
    deep = rerank != "none" or _has_pca(bundle)
    return min(n, max(4 * k, RERANK_CANDIDATES)) if deep else k


def _has_pca(bundle: Bundle) -> bool:
    return bool((bundle.manifest.get("index") or {}).get("pca_dim"))


def rank_hits(
    bundle: Bundle, query: np.ndarray, scores: np.ndarray, rows: np.ndarray, k: int, rerank: str
) -> list[Hit]:
    """The first k hits of one query from the index's answer (`scores`, `rows` for the
    prepared `query`), re-ranked when asked. The command line and the server both rank
    through this, so they answer the same image alike."""
    found = [(float(sc), int(row)) for sc, row in zip(scores, rows, strict=True)
             if row >= 0]  # an approximate index may not fill every slot  # fmt: skip
    pca = _has_pca(bundle)
    if found and (pca or rerank != "none"):
        cand = _rows_of(bundle, [row for _, row in found])  # read once, for both steps
        if pca:
            scores, order = exact_scores(cand, query, bundle.metric)
            found = [(float(scores[j]), found[j][1]) for j in order]
            cand = cand[order]
        if rerank != "none":
            found = [found[j] for j in rerank_candidates(query, cand, rerank)]
    hits = []
    for score, row in found[:k]:
        meta = bundle.metadata[row]
        hits.append(Hit(len(hits) + 1, score, row, meta["class"], meta["path"]))
    return hits


def exact_scores(cand: np.ndarray, query: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, best-first order) of candidates `cand` (their stored full-length embeddings)
    against the prepared `query`.

    A PCA bundle's index ranks in the reduced (centred) space, whose cosines differ from the
    full-length ones that `verify` reports and the calibrated threshold was set on; so its
    candidates are scored again here (a refinement step, like Faiss's IndexRefine), and every
    score a user sees is on the threshold's scale."""
    if metric == "cosine":
        scores = l2_normalize(cand) @ query
        return scores, np.argsort(-scores, kind="stable")
    scores = ((cand - query[None, :]) ** 2).sum(axis=1)
    return scores, np.argsort(scores, kind="stable")


RERANK_CANDIDATES = 50


def default_rerank(bundle: Bundle, asked: str) -> str:
    """`auto`: the re-ranker the exporting evaluation measured a gain for (a bundle from
    `evaluate.py --export`), else none; anything else as asked."""
    if asked != "auto":
        return asked
    chosen = (bundle.manifest.get("rerank") or {}).get("default", "none")
    return chosen if chosen in RERANKERS else "none"  # untrusted manifest: known names only


def _rows_of(bundle: Bundle, rows: list[int]) -> np.ndarray:
    """Stored embeddings of `rows`: an array (or memmap), or a sharded bundle's reader."""
    emb = bundle.embeddings
    picked = emb[rows] if isinstance(emb, np.ndarray) else emb.take(rows)
    return np.asarray(picked, dtype=np.float32)


# --- output --------------------------------------------------------------------------------


CLASS_COLUMN = 40  # the table's class column; --json keeps every name whole


def _print_table(run: SearchRun, bundle: Bundle) -> None:
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


def hit_dict(h: Hit) -> dict:
    d = asdict(h)
    d["class"] = d.pop("cls")
    return d


def _json_doc(run: SearchRun, bundle: Bundle, load_ms: float) -> dict:
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


THUMB = 128
CAPTION = 30
PAD = 6
COLOURS = {"match": (30, 160, 60), "miss": (210, 40, 40), "unknown": (150, 150, 150),
           "query": (40, 80, 200)}  # fmt: skip


def thumbnail(path: Path | None):
    """A thumbnail PIL image, or None when there is no readable file."""
    from PIL import Image, ImageOps

    if path is None:
        return None
    try:
        img = Image.fromarray(load_image(path, THUMB))
    except MltrainError:
        return None
    return ImageOps.contain(img, (THUMB, THUMB))  # small images are scaled up too


def _placeholder(text: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
    ImageDraw.Draw(img).text((8, THUMB // 2 - 6), text, fill=(90, 90, 90))
    return img


def write_sheet(run: SearchRun, bundle: Bundle, out: str | Path) -> Path:
    """A PNG grid: one row per answered query, the query then its hits, captioned."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in run.results if r.error is None]
    cols = 1 + max([0, *(len(r.hits) for r in rows)])
    cell_w, cell_h = THUMB + 2 * PAD, THUMB + 2 * PAD + CAPTION
    sheet = Image.new("RGB", (cols * cell_w, max(1, len(rows)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    classes = set(bundle.classes)

    def cell(row: int, col: int, img, outline, lines: list[str]) -> None:
        x, y = col * cell_w, row * cell_h
        draw.rectangle([x + 2, y + 2, x + cell_w - 3, y + THUMB + 2 * PAD - 3], outline=outline,
                       width=3)  # fmt: skip
        sheet.paste(img, (x + PAD + (THUMB - img.width) // 2, y + PAD + (THUMB - img.height) // 2))
        for n, line in enumerate(lines):
            draw.text((x + PAD, y + THUMB + 2 * PAD + 1 + 13 * n), line[:22], fill="black",
                      font=font)  # fmt: skip

    missing = 0
    for r_i, r in enumerate(rows):
        qpath = Path(r.query)
        qclass = qpath.parent.name
        img = thumbnail(qpath) or _placeholder("unreadable")
        cell(r_i, 0, img, COLOURS["query"], ["query", printable(qpath.name)])
        for h in r.hits:
            # A path that escapes its root is a tampered bundle: a BundleError, no sheet.
            img = thumbnail(safe_image_path(bundle, h.path))
            missing += img is None
            img = img or _placeholder("missing")
            if qclass not in classes:
                outline = COLOURS["unknown"]
            else:
                outline = COLOURS["match"] if h.cls == qclass else COLOURS["miss"]
            cell(r_i, h.rank, img, outline, [printable(h.cls), f"{h.score:.3f}"])
    shown = sum(len(r.hits) for r in rows)
    if missing and missing == shown:  # a wrong --image-root, or a bundle moved without images
        print(f"note: none of the {shown} hit images was found under {printable(bundle.root)}; "
              "pass the folder that holds them with --image-root", file=sys.stderr)  # fmt: skip
    out = Path(out)
    files.atomic_write(out, lambda f: sheet.save(f, format="PNG"))  # no half-written PNG
    return out


def check_sheet_target(out: str | Path) -> None:
    """Before any search: `--sheet` must name a file in a folder we can write (the first
    existing one on its path, when the rest is still to be made)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--sheet {out} is a folder; give a file path such as "
                          f"{out / 'sheet.png'}")  # fmt: skip
    if out.suffix.lower() != ".png":  # the sheet is written as PNG: no mislabelled file
        raise ConfigError(f"--sheet {out}: the contact sheet is a PNG; name it "
                          f"{out.with_suffix('.png').name}")  # fmt: skip
    folder = out.parent.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"--sheet {out}: {folder} is not a folder; fix the path")
    check_writable(folder, "--sheet: choose a file in a writable folder")


# --- command line --------------------------------------------------------------------------


def _add_parser() -> argparse.ArgumentParser:
    """`mltrain add`: the search command's --add, with only the arguments it takes."""
    p = argparse.ArgumentParser(
        prog="mltrain add",
        description="Enroll images into a search bundle: embedded with the bundle's own model, "
                    "copied into BUNDLE/images/, one image per class is enough. The bundle is "
                    "replaced in a single step, so an interrupted add leaves the old one.",
    )  # fmt: skip
    p.add_argument("bundle", help="search bundle folder (from export or evaluate.py --export)")
    p.add_argument("images", nargs="+", help="images, or folders of class sub-folders")
    p.add_argument("--class", dest="class_name", help="class of every new image (default: "
                   "each image's folder name)")  # fmt: skip
    return p


def _parser(prog: str = "mltrain-search") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("bundle", help="search bundle folder (written by evaluate.py --export)")
    p.add_argument("images", nargs="+", help="query images (with --add: images or folders)")
    p.add_argument("-k", type=int, default=None, help="neighbours per query")
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet to this file")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--image-root", help="the bundle's images are now here (thumbnails)")
    p.add_argument("--add", action="store_true", help="add the images to the bundle instead")
    p.add_argument("--class", dest="class_name", help="with --add: class of every new image")
    p.add_argument("--rerank", default="auto", choices=("auto", *RERANKERS),
                   help="re-order the top candidates: k_reciprocal or alpha_qe; auto (default): "
                        "what the evaluation that exported the bundle found helps, else none")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="embed queries with torch or onnx (the bundle's model.onnx, from "
                        "export --onnx); auto (default): onnx where the bundle has it, else torch")
    p.add_argument("--threshold", metavar="auto|T",
                   help="mark hits as match / no match at this similarity; auto: the bundle's "
                        "calibrated threshold at FAR 1e-3; 'unknown' when the best hit is below")
    return p


def threshold_value(
    bundle: Bundle, text: str, name: str = "--threshold", choices: str = "auto"
) -> tuple[float, dict[str, Any] | None]:
    """`text` as a similarity threshold: a finite number, or `auto` for the bundle's
    calibrated one. Returns it with the calibration it came from (None for a number), so
    callers can say when that calibration is approximate. A number outside [-1, 1] is
    refused: no cosine similarity reaches past it, so every hit would be marked alike.

    `name` is what the user typed it as (the command line's `--threshold`, the server's
    query parameter `threshold`); `choices` the words it takes besides a number."""
    if bundle.metric != "cosine":
        raise ConfigError(f"{name} needs a cosine bundle; this one ranks by L2 distance")
    if text == "auto":
        cal = threshold_for(bundle.manifest)
        return float(cal["threshold"]), cal
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"{name}: expected {choices} or a finite number, got {text[:40]!r}")
    if not -1 <= value <= 1:  # a slip (a percentage?) that would mark every hit alike
        raise ConfigError(f"{name} {value:g} is outside [-1, 1], the range of a cosine "
                          f"similarity; give a value in it or {choices}")  # fmt: skip
    return value, None


def apply_threshold(run: SearchRun, threshold: float) -> None:
    """Mark every hit as match or not and answer each query: its top hit's class, or
    "unknown" when even that is below the threshold (an identity never enrolled)."""
    for r in run.results:
        for h in r.hits:
            h.match = h.score >= threshold
        if r.error is None:
            r.answer = r.hits[0].cls if r.hits and r.hits[0].match else "unknown"


def _search_only_flags(args: argparse.Namespace) -> list[str]:
    """Search flags given with `--add` (which searches nothing), so none is silently ignored;
    `mltrain add` has none of them."""
    given = {"-k": getattr(args, "k", None) is not None, "--sheet": getattr(args, "sheet", None),
             "--json": getattr(args, "json", False),
             "--threshold": getattr(args, "threshold", None) is not None,
             "--image-root": getattr(args, "image_root", None),
             "--rerank": getattr(args, "rerank", "auto") != "auto",
             "--backend": getattr(args, "backend", "auto") != "auto"}  # fmt: skip
    return [flag for flag, on in given.items() if on]


def _run(argv: Sequence[str] | None, command: str | None) -> int:
    if command == "add":
        args = _add_parser().parse_args(argv)
        args.add = True
    else:
        args = _parser(f"mltrain {command}" if command else "mltrain-search").parse_args(argv)
    if args.add:
        ignored = _search_only_flags(args)
        if ignored:
            verb = "applies" if len(ignored) == 1 else "apply"
            print(f"error: {', '.join(ignored)} only {verb} to a search, not with --add",
                  file=sys.stderr)  # fmt: skip
            return 2
        target = args.images[0] if len(args.images) == 1 else args.images
        added = add_images(args.bundle, target, args.class_name)
        total = load_bundle(args.bundle).manifest["count"]
        why = "" if added else ": every one was already in it"
        print(f"added {counted(added, 'image')} to {printable(args.bundle)} (now {total}){why}")
        return 0
    if args.class_name:
        print("error: --class only applies with --add", file=sys.stderr)
        return 2
    if args.sheet:
        check_sheet_target(args.sheet)
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle, args.image_root)
    load_ms = (time.perf_counter() - t0) * 1e3
    k = args.k if args.k is not None else int(bundle.manifest["config"]["export"]["k"])
    if k < 1:
        print(f"error: -k must be at least 1, got {k}", file=sys.stderr)
        return 2
    if k > len(bundle):
        print(f"note: -k {k} exceeds the bundle's {len(bundle)} images; using {len(bundle)}",
              file=sys.stderr)  # fmt: skip
    threshold, cal = (None, None) if args.threshold is None else threshold_value(
        bundle, args.threshold)  # fmt: skip
    note = None if cal is None else calibration_note(cal)
    run = search_images(bundle, args.images, k, default_rerank(bundle, args.rerank),
                        args.backend)
    if threshold is not None:
        apply_threshold(run, threshold)
    for r in run.results:
        if r.error is not None:
            print(f"error: query {printable(r.query)}: {printable(r.error)}", file=sys.stderr)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        doc = _json_doc(run, bundle, load_ms)
        if threshold is not None:
            doc["threshold"] = threshold
            if cal is not None:
                doc["threshold_resolved"] = is_resolved(cal)
        print(json.dumps(doc, indent=2))
    else:
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
        _print_table(run, bundle)
    if args.sheet:
        out = write_sheet(run, bundle, args.sheet)
        print(f"contact sheet: {printable(out)}", file=sys.stderr if args.json else sys.stdout)
    return 1 if any(r.error is not None for r in run.results) else 0


def main(argv: Sequence[str] | None = None, command: str | None = None) -> int:
    """Entry point of `mltrain search` / `mltrain add` (`command`) and of `mltrain-search`
    (None); a bad bundle or argument, a file that cannot be written or too little memory
    prints one line (no traceback) and returns 2; Ctrl-C returns 130 (an interrupted --add or
    --sheet leaves the old bundle and no partial file)."""
    try:
        with term_as_interrupt():
            return _run(argv, command)
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        return INTERRUPTED
    except (MltrainError, OSError, MemoryError) as e:
        print(error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
