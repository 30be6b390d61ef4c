"""Evaluate embeddings of a run's held-out images: every figure the report shows."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from mltrain.ann_eval import index_comparison, pca_sweep, shortest_within
from mltrain.config import Config, save_config
from mltrain.errors import DataError
from mltrain.inference import Embedder
from mltrain.metrics import (
    CURVE_KEYS,
    book_accuracy,
    confused_pairs,
    mean_per_class_precision_at_1,
    one_shot_accuracy,
    per_class_metrics,
    retrieval_metrics,
    verification_metrics,
    worst_classes,
)
from mltrain.rundata import RunData, prepare_data


@dataclass
class EmbeddedSplit:
    """Embeddings of the held-out images (queries) and of the training images."""

    classes: list[str]
    heldout_emb: np.ndarray
    heldout_labels: np.ndarray
    heldout_paths: list[Path]
    train_emb: np.ndarray
    train_labels: np.ndarray
    same_set: bool  # split none: train and held-out are the same images


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    split: EmbeddedSplit
    neighbours: Any  # mltrain.metrics.Neighbours of the held-out queries
    curves: dict[str, list[float]] = field(default_factory=dict)


def embed_split(embedder: Embedder, data: RunData) -> EmbeddedSplit:
    held, train = data.split.heldout, data.split.train
    labels = data.folder.labels
    held_emb = embedder.embed(data.paths(held), labels[held], desc="held-out embeddings")
    same = data.split.kind == "none"
    train_emb = (
        held_emb
        if same
        else embedder.embed(data.paths(train), labels[train], desc="training embeddings")
    )
    return EmbeddedSplit(
        list(data.folder.classes),
        held_emb,
        labels[held],
        data.paths(held),
        train_emb,
        labels[train],
        same,
    )


def compute_metrics(s: EmbeddedSplit, cfg: Config) -> EvalResult:
    """All figures from embeddings alone (no model): retrieval, per-class, verification,
    one-shot, the book protocol, the PCA sweep and the index comparison."""
    e = cfg.eval
    gallery = {}
    if e.gallery == "train" and not s.same_set:
        gallery = {"gallery_emb": s.train_emb, "gallery_labels": s.train_labels}
    m, nb = retrieval_metrics(s.heldout_emb, s.heldout_labels, metric=e.metric, ks=e.ks, **gallery)
    metrics: dict[str, Any] = {k: v for k, v in m.items()}
    scored_labels = nb.labels[nb.scored]
    per_class = per_class_metrics(scored_labels, nb.query_labels[nb.scored], s.classes)
    metrics["mean_per_class_precision_at_1"] = mean_per_class_precision_at_1(per_class)
    metrics["per_class"] = per_class
    metrics["worst_classes"] = worst_classes(per_class, 10)
    metrics["confused_pairs"] = confused_pairs(
        scored_labels, nb.query_labels[nb.scored], s.classes, 10
    )
    if s.same_set:
        metrics["book_accuracy"] = book_accuracy(s.heldout_emb, s.heldout_labels, k=4)
    ver = verification_metrics(
        s.heldout_emb, s.heldout_labels, e.metric, e.verification_pairs, cfg.seed
    )
    curves = {k: ver.pop(k) for k in CURVE_KEYS}
    metrics["verification"] = ver
    metrics["one_shot"] = {
        str(n): one_shot_accuracy(s.heldout_emb, s.heldout_labels, n, e.one_shot_episodes, cfg.seed)
        for n in e.one_shot_ways
    }
    rows = pca_sweep(s.train_emb, s.heldout_emb, s.heldout_labels, e.pca_lengths, e.metric)
    metrics["pca"] = {str(r["length"]): r for r in rows}
    metrics["pca_shortest_within_0.5"] = shortest_within(rows)["length"]
    metrics["indexes"] = index_comparison(
        s.heldout_emb, s.heldout_labels, s.heldout_emb, s.heldout_labels, e.index_types, e.metric
    )
    return EvalResult(metrics, s, nb, curves)


def new_eval_dir(base: Path, create: bool = True) -> Path:
    """A free `base/eval/<time>[-N]`; with `create=False` only its name (evaluate.py writes
    into a staging folder and renames it there when done)."""
    out = base / "eval" / datetime.now().strftime("%Y%m%d-%H%M%S")
    n = 1
    while out.exists():
        out, n = out.with_name(f"{out.name}-{n}"), n + 1
    if create:
        out.mkdir(parents=True)
    return out


def evaluate(embedder: Embedder, out_dir: Path, source: str) -> EvalResult:
    """Embed the run's split, compute every metric, write metrics.json, embeddings and report."""
    from mltrain.report import write_report  # matplotlib and TensorBoard only when reporting

    cfg = embedder.cfg
    save_config(cfg, out_dir / "config.yaml")
    data = prepare_data(cfg, out_dir)
    if len(set(data.folder.labels[data.split.heldout].tolist())) < 2:
        raise DataError("the held-out split has fewer than 2 classes; nothing to retrieve")
    start = time.perf_counter()
    split = embed_split(embedder, data)
    embed_s = time.perf_counter() - start
    np.save(out_dir / "heldout_embeddings.npy", split.heldout_emb)
    np.save(out_dir / "heldout_labels.npy", split.heldout_labels)
    start = time.perf_counter()
    result = compute_metrics(split, cfg)
    result.metrics["timing"] = {
        "embed_seconds": embed_s,
        "metrics_seconds": time.perf_counter() - start,
    }
    result.metrics["source"] = source
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, default=_jsonable))
    gallery_paths = data.paths(data.split.train) if cfg.eval.gallery == "train" else None
    write_report(out_dir, result, tsne=cfg.eval.tsne, tsne_max_points=cfg.eval.tsne_max_points,
                 seed=cfg.seed, gallery_paths=gallery_paths)
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
