"""Searching a bundle with query images: embed them with the bundle's own model, search its
gallery one query per call, re-score and re-rank the candidates, and mark hits against a
similarity threshold. The command line (`mltrain search`) and the server
(`mltrain.retrieval.service`) both answer through these functions, so an image gets the same
hits and scores from either.

Scores are cosine similarities (higher is closer) for cosine bundles, squared L2 distances
(lower is closer) for l2 bundles. An unreadable query gets an error of its own and the
other queries still run (`mltrain.retrieval.queries`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mltrain.errors import ConfigError
from mltrain.retrieval.bundle import Bundle
from mltrain.retrieval.bundle_model import bundle_embedder, choose_backend
from mltrain.retrieval.index import l2_normalize, prepare, timed_single_queries
from mltrain.retrieval.queries import embed_queries, readable_queries
from mltrain.retrieval.rerank import RERANKERS, rerank_candidates
from mltrain.retrieval.verify import threshold_for


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


def search_images(
    bundle: Bundle,
    paths: Sequence[str | Path],
    k: int,
    rerank: str = "none",
    backend: str = "auto",
    label: int | None = None,
) -> SearchRun:
    """Embed `paths` with the bundle's model and search its gallery, one query per call.

    `backend` runs the model with torch, onnxruntime or OpenVINO (see `choose_backend`); `label`
    limits the hits to that class (`gallery.label_of` turns a class name into it).

    With `rerank` (see `mltrain.retrieval.rerank`) the index returns max(4k, 50) candidates,
    which are re-ordered with their stored embeddings, and the first k are kept; the timed
    search is `gallery_search` (the index call, or the exact scoring of a class filter).
    Scores are the index's, except a PCA bundle's, whose max(4k, 50) candidates are scored
    again at full length (`exact_scores`), and those `gallery_search` scores exactly."""
    paths = [Path(p) for p in paths]
    results = [QueryResult(str(p)) for p in paths]
    gallery, metric = bundle.gallery, bundle.metric
    gallery.check_metric(metric)
    k = max(1, min(k, gallery.count()))
    errors: dict[int, str] = {}
    candidates = readable_queries(paths, errors)
    if not candidates:  # every query is missing or a folder: no model to build
        _record_errors(results, errors)
        return SearchRun(results, k, 0.0, 0.0, rerank, choose_backend(bundle, backend))
    t0 = time.perf_counter()
    embedder = bundle_embedder(bundle, backend, images=len(candidates))
    model_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    embs = embed_queries(embedder, paths, candidates, errors)
    embed_ms = (time.perf_counter() - t0) * 1e3
    _record_errors(results, errors)
    deep = search_depth(bundle, k, rerank)
    order = list(embs)
    queries = (np.concatenate([prepare(embs[i][None, :], metric, "query") for i in order])
               if order else np.empty((0, gallery.dim), np.float32))  # fmt: skip
    timed = timed_single_queries(lambda q: gallery_search(bundle, q, deep, label), queries)
    for n, (i, (seconds, (scores, rows))) in enumerate(zip(order, timed, strict=True)):
        results[i].search_us = seconds * 1e6
        results[i].hits = rank_hits(bundle, queries[n], scores[0], rows[0], k, rerank)
    return SearchRun(results, k, embed_ms, model_ms, rerank, embedder.backend)


def _record_errors(results: list[QueryResult], errors: dict[int, str]) -> None:
    for i, text in errors.items():
        results[i].error = text


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
        score = min(max(score, -1.0), 1.0) if bundle.metric == "cosine" else score  # fp32 1.0000001
        hits.append(Hit(len(hits) + 1, score, row, meta["class"], meta["path"]))
    return hits


def exact_scores(cand: np.ndarray, query: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, best-first order) of candidates `cand` (their stored full-length embeddings)
    against the prepared `query`.

    A PCA bundle's index ranks in the reduced (centred) space, whose cosines differ from the
    full-length ones that `verify` reports and the calibrated threshold was set on; so its
    candidates are scored again here (a refinement step, like Faiss's IndexRefine), and every
    score a user sees is on the threshold's scale."""
    scores = _scores(cand, query, metric)
    return scores, _best_first(scores, metric)


def _scores(cand: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return l2_normalize(cand) @ query
    return ((cand - query[None, :]) ** 2).sum(axis=1)


def _best_first(scores: np.ndarray, metric: str, depth: int | None = None) -> np.ndarray:
    """Positions of the best `depth` scores (all when None), best first."""
    key = -scores if metric == "cosine" else scores
    if depth is not None and depth < len(key):
        part = np.argpartition(key, depth - 1)[:depth]
        return part[np.argsort(key[part], kind="stable")]
    return np.argsort(key, kind="stable")


def gallery_search(
    bundle: Bundle,
    queries: np.ndarray,
    depth: int,
    label: int | None = None,
    lock: AbstractContextManager | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (n_queries, depth), for prepared `queries`; unfilled slots have
    row -1. The gallery's index answers (under `lock`, where the caller shares it), except
    where it cannot answer in full:

    - `label` (one class's hits): an approximate index filtered to a few rows misses some of
      them (HNSW's graph found 16 of a class's 20 images), so the class is scored whole from
      its stored embeddings (`exact_search`).
    - a query the index returns fewer than `depth` rows for, of a gallery holding that many
      (HNSW reaches only part of its graph for a large k): scored whole the same way, where
      the gallery's embeddings are at most `EXACT_FALLBACK_BYTES`; a larger one keeps the
      index's partial answer rather than read gigabytes for one query."""
    if label is not None:
        return exact_search(bundle, queries, depth, bundle.rows_of_class(label))
    with lock or nullcontext():
        scores, rows = bundle.gallery.search(queries, depth)
    short = (rows >= 0).sum(axis=1) < min(depth, len(bundle))
    if short.any() and len(bundle) * bundle.gallery.dim * 4 <= EXACT_FALLBACK_BYTES:
        scores, rows = scores.copy(), rows.copy()
        scores[short], rows[short] = exact_search(bundle, queries[short], depth)
    return scores, rows


EXACT_CHUNK_BYTES = 32 * 2**20  # stored embeddings are scored about this much at a time
EXACT_FALLBACK_BYTES = 512 * 2**20  # a short answer is completed exactly up to this gallery


def exact_search(
    bundle: Bundle, queries: np.ndarray, depth: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The best `depth` of `rows` (all rows when None) for each prepared query, scored from the
    stored full-length embeddings as `exact_scores` scores them (each chunk ranked only for
    its best `depth`); unfilled slots have row -1."""
    n = len(bundle) if rows is None else len(rows)
    step = max(1, EXACT_CHUNK_BYTES // (4 * queries.shape[1]))
    best = [(np.empty(0, np.float32), np.empty(0, np.int64)) for _ in queries]
    for start in range(0, n, step):
        end = min(n, start + step)
        if rows is None:  # a slice reads the memory map (or the shards) in order
            ids, cand = np.arange(start, end), np.asarray(bundle.embeddings[start:end], np.float32)
        else:
            ids = np.asarray(rows[start:end], np.int64)
            cand = _rows_of(bundle, ids.tolist())
        for i, q in enumerate(queries):
            scores = np.concatenate([best[i][0], _scores(cand, q, bundle.metric)])
            found = np.concatenate([best[i][1], ids])
            keep = _best_first(scores, bundle.metric, depth)
            best[i] = (scores[keep], found[keep])
    out_scores = np.full((len(queries), depth), np.nan, np.float32)
    out_rows = np.full((len(queries), depth), -1, np.int64)
    for i, (scores, found) in enumerate(best):
        out_scores[i, : len(found)], out_rows[i, : len(found)] = scores, found
    return out_scores, out_rows


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


def hit_dict(h: Hit) -> dict:
    """A hit as JSON answers write it (`cls` is the key `class`)."""
    d = asdict(h)
    d["class"] = d.pop("cls")
    return d


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
