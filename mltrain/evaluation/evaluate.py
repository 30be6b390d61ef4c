"""Evaluate embeddings of a run's held-out images: every figure the report shows."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from mltrain.config import Config, save_config, to_dict
from mltrain.data.pipeline import RunData, prepare_data, record_data
from mltrain.errors import DataError
from mltrain.evaluation.metrics import (
    book_accuracy,
    confused_pairs,
    mean_per_class_precision_at_1,
    per_class_metrics,
    retrieval_metrics,
    worst_classes,
)
from mltrain.evaluation.plan import EvalPlan, plan_evaluation
from mltrain.evaluation.rerank_eval import rerank_comparison
from mltrain.evaluation.sweeps import index_comparison, pca_sweep, shortest_within
from mltrain.evaluation.verification import (
    CURVE_KEYS,
    one_shot_accuracy,
    one_shot_within,
    verification_metrics,
)
from mltrain.inference.embedder import Embedder


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
    neighbours: Any  # mltrain.evaluation.metrics.Neighbours of the held-out queries
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
        labels[held] if same else labels[train],  # none: held-out copies may have been dropped
        same,
    )


def plan_for(cfg: Config, data: RunData, dim: int) -> EvalPlan:
    """The evaluation that fits this split, from counts alone (before embedding)."""
    held = data.folder.labels[data.split.heldout]
    parents = parents_of(data.folder.classes, held)
    return _fitted_plan(cfg, held, len(data.split.train), data.split.kind == "none", dim,
                        parents)  # fmt: skip


def parents_of(classes: list[str], labels: np.ndarray) -> np.ndarray:
    """Each image's parent folder, from its class's name (`Greek/character01`: `Greek`;
    a top-level class: ""): the group of within-parent one-shot episodes."""
    parent = np.array([c.rpartition("/")[0] for c in classes] or [""], dtype=object)
    return parent[np.asarray(labels, dtype=np.int64)]


def _fitted_plan(
    cfg: Config, heldout_labels: np.ndarray, train_rows: int, same_set: bool, dim: int,
    parents: np.ndarray | None = None,
) -> EvalPlan:
    """PCA fits on the training rows (the held-out ones when both are the same set); queries
    search the other held-out rows, or the training rows with `eval.gallery: train`."""
    n_train = len(heldout_labels) if same_set else train_rows
    use_train = cfg.eval.gallery == "train" and not same_set
    gallery = train_rows if use_train else len(heldout_labels) - 1
    return plan_evaluation(cfg.eval, n_train, heldout_labels, dim, gallery, parents)


def compute_metrics(s: EmbeddedSplit, cfg: Config, plan: EvalPlan | None = None) -> EvalResult:
    """All figures from embeddings alone (no model): retrieval, per-class, verification,
    one-shot, the book protocol, the PCA sweep and the index comparison, as far as `plan`
    (by default fitted to `s`) allows; its notes and skips go into the metrics."""
    e = cfg.eval
    if plan is None:
        dim = s.heldout_emb.shape[1]
        plan = _fitted_plan(cfg, s.heldout_labels, len(s.train_emb), s.same_set, dim,
                            parents_of(s.classes, s.heldout_labels))  # fmt: skip
    gallery = {}
    if e.gallery == "train" and not s.same_set:
        gallery = {"gallery_emb": s.train_emb, "gallery_labels": s.train_labels}
    m, nb = retrieval_metrics(
        s.heldout_emb, s.heldout_labels, metric=e.metric, ks=plan.ks, **gallery
    )
    metrics: dict[str, Any] = {k: v for k, v in m.items()}
    scored_labels = nb.labels[nb.scored]
    per_class = per_class_metrics(scored_labels, nb.query_labels[nb.scored], s.classes)
    metrics["mean_per_class_precision_at_1"] = mean_per_class_precision_at_1(per_class)
    metrics["per_class"] = per_class
    metrics["worst_classes"] = worst_classes(per_class, 10)
    metrics["confused_pairs"] = confused_pairs(
        scored_labels, nb.query_labels[nb.scored], s.classes, 10
    )
    if s.same_set and len(s.heldout_emb) > 4:
        metrics["book_accuracy"] = book_accuracy(s.heldout_emb, s.heldout_labels, k=4)
    curves: dict[str, list[float]] = {}
    if plan.verification_pairs:
        ver = verification_metrics(
            s.heldout_emb, s.heldout_labels, e.metric, plan.verification_pairs, cfg.seed
        )
        curves = {k: ver.pop(k) for k in CURVE_KEYS}
        metrics["verification"] = ver
    metrics["one_shot"] = {
        str(n): one_shot_accuracy(s.heldout_emb, s.heldout_labels, n, e.one_shot_episodes, cfg.seed)
        for n in plan.one_shot_ways
    }
    if plan.one_shot_within_ways:  # nested classes: episodes within one parent folder
        parents = parents_of(s.classes, s.heldout_labels)
        within = {str(n): one_shot_within(s.heldout_emb, s.heldout_labels, parents, n,
                                          e.one_shot_episodes, cfg.seed)
                  for n in plan.one_shot_within_ways}  # fmt: skip
        metrics["one_shot_within_parent"] = {n: None if w is None else w[0]
                                             for n, w in within.items()}  # fmt: skip
        metrics["one_shot_within_parent_by_group"] = {n: w[1] for n, w in within.items() if w}
    rows = pca_sweep(s.train_emb, s.heldout_emb, s.heldout_labels, plan.pca_lengths, e.metric)
    metrics["pca"] = {str(r["length"]): r for r in rows}
    metrics["pca_shortest_within_0.5"] = shortest_within(rows)["length"]
    metrics["indexes"] = index_comparison(
        s.heldout_emb,
        s.heldout_labels,
        s.heldout_emb,
        s.heldout_labels,
        plan.index_types,
        e.metric,
    )
    notes = list(plan.notes)
    if e.rerank and e.metric == "cosine" and len(s.heldout_emb) > 2:
        metrics["rerank"] = rerank_comparison(s.heldout_emb, s.heldout_labels, cfg.seed)
        notes.append(rerank_note(metrics["rerank"]))
    metrics["notes"] = notes
    metrics["skipped"] = dict(plan.skipped)
    return EvalResult(metrics, s, nb, curves)


def rerank_note(r: dict[str, Any]) -> str:
    """One line: what each re-ranker does to MAP@R here, and which one to use, if any."""
    base = r["none"]["map_at_r"]
    parts = [f"{m} {r[m]['map_at_r']:.4f} ({r[m]['map_at_r'] - base:+.4f}, "
             f"P@1 {r[m]['precision_at_1']:.4f})" for m in r if m not in ("none", "rows")
             and isinstance(r[m], dict)]  # fmt: skip
    advice = (f"search with --rerank {r['recommended']}" if r["recommended"] != "none"
              else "no re-ranker gains half a point of MAP@R, two standard errors clear of "
              "the noise, here; search with none")  # fmt: skip
    return (f"re-ranking on {r['rows']} held-out rows: MAP@R {base:.4f} without, "
            f"{'; '.join(parts)}; {advice}")


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


def evaluate(
    embedder: Embedder, out_dir: Path, source: str, data: RunData | None = None
) -> EvalResult:
    """Embed the run's split, compute every metric, write metrics.json, embeddings and report.

    `data` is the run's data already prepared into `out_dir` (else it is prepared here)."""
    # matplotlib and TensorBoard only when reporting
    from mltrain.evaluation.report import write_report

    cfg = embedder.cfg
    save_config(cfg, out_dir / "config.yaml")
    if data is None:
        data = prepare_data(cfg, out_dir)
    else:
        record_data(data, out_dir)
    if len(set(data.folder.labels[data.split.heldout].tolist())) < 2:
        raise DataError("the held-out split has fewer than 2 classes; nothing to retrieve")
    plan = plan_for(cfg, data, embedder.embedding_dim)  # size checks before embedding
    plan.notes[:0] = data.folder.notes
    if cfg.model.crop_mode == "auto":  # a checkpoint's config holds what training chose
        plan.notes.append(f"model.crop_mode auto: the backbone's own geometry "
                          f"({embedder.dcfg.get('crop_mode', 'center')}); training chooses "
                          "center or squash on its validation images")
        print(f"note: {plan.notes[-1]}", file=sys.stderr)
    start = time.perf_counter()
    split = embed_split(embedder, data)
    embed_s = time.perf_counter() - start
    np.save(out_dir / "heldout_embeddings.npy", split.heldout_emb)
    np.save(out_dir / "heldout_labels.npy", split.heldout_labels)
    start = time.perf_counter()
    result = compute_metrics(split, cfg, plan)
    result.metrics["timing"] = {
        "embed_seconds": embed_s,
        "metrics_seconds": time.perf_counter() - start,
    }
    result.metrics["source"] = source
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, default=_jsonable))
    gallery_paths = data.paths(data.split.train) if cfg.eval.gallery == "train" else None
    write_report(out_dir, result, tsne=plan.tsne, tsne_max_points=cfg.eval.tsne_max_points,
                 seed=cfg.seed, gallery_paths=gallery_paths, step=embedder.global_step,
                 config=to_dict(cfg), metric=cfg.eval.metric)
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
