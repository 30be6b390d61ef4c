"""Verification and one-shot metrics on embeddings: pure functions of embeddings and labels.

- verification: balanced genuine / impostor pairs scored by similarity, summarised by their ROC
  (AUC, EER, TAR at a FAR, the best threshold) as face and signature checks report it;
- one-shot: N-way episodes, one support image per class, a query right when its most similar
  support is its own class's; `one_shot_within` draws an episode's classes from one group (an
  alphabet of Omniglot), the standard protocol for nested data, and scores each group too.

Retrieval metrics (precision@k, MAP@R, per-class views) are in `mltrain.evaluation.metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from mltrain.errors import ConfigError, DataError
from mltrain.evaluation.metrics import check_labelled
from mltrain.inference.vectors import l2_normalize
from mltrain.retrieval.index import check_metric
from mltrain.retrieval.pairs import calibrate_threshold, class_blocks, pair_scores, sample_pairs

# Keys of `verification_metrics` that hold lists (the ROC curve) rather than scalars.
CURVE_KEYS = ("fpr", "tpr")


def roc_summary(same: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Verification figures from pair labels and scores (higher score = more likely same)."""
    fpr, tpr, thresholds = roc_curve(same, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    pos, neg = int(same.sum()), int((~same).sum())
    accuracy = (tpr * pos + (1.0 - fpr) * neg) / (pos + neg)
    accuracy[~np.isfinite(thresholds)] = -1.0  # the "accept nothing" point has threshold +inf
    best = int(np.argmax(accuracy))
    plot_fpr, plot_tpr, _ = roc_curve(same, scores)  # thinned for plotting only
    return {
        "roc_auc": float(roc_auc_score(same, scores)),
        "eer": float((fpr[i] + fnr[i]) / 2),
        "tar_at_far_1e-2": float(tpr[fpr <= 1e-2].max()),
        "tar_at_far_1e-3": float(tpr[fpr <= 1e-3].max()),
        "best_threshold": float(thresholds[best]),
        "best_accuracy": float(accuracy[best]),
        "fpr": plot_fpr.tolist(),
        "tpr": plot_tpr.tolist(),
    }


def verification_metrics(
    emb: np.ndarray,
    labels: np.ndarray,
    metric: str = "cosine",
    num_pairs: int = 20000,
    seed: int = 0,
) -> dict[str, Any]:
    """Same-class verification on balanced sampled pairs (see `sample_pairs`).

    Scalars: roc_auc, eer, tar_at_far_1e-2, tar_at_far_1e-3 (TAR at the largest threshold
    with FAR <= the target), best_threshold (accept a pair when score >= it; a cosine
    similarity, or a negative L2 distance for metric="l2"), best_accuracy,
    threshold_at_far_1e-3 (the lowest score that keeps FAR <= 1e-3 on these pairs, as a bundle
    calibrates it for `mltrain verify`), num_pairs, num_genuine, num_impostor, num_classes
    (the classes the pairs are drawn from: few make the EER coarse, whatever the pair count).
    Lists (`CURVE_KEYS`): "fpr" and "tpr", the ROC curve for plotting.
    """
    emb, labels = check_labelled(emb, labels)
    i, j, same = sample_pairs(labels, num_pairs, seed)
    scores = pair_scores(emb, i, j, metric)
    out = roc_summary(same, scores)
    out["threshold_at_far_1e-3"] = calibrate_threshold(same, scores, 1e-3)["threshold"]
    out["num_pairs"] = int(len(same))
    out["num_genuine"], out["num_impostor"] = int(same.sum()), int((~same).sum())
    out["num_classes"] = int(np.unique(labels).size)
    return out


def one_shot_accuracy(
    emb: np.ndarray,
    labels: np.ndarray,
    n_way: int,
    episodes: int = 500,
    seed: int = 0,
    metric: str = "cosine",
) -> float | None:
    """N-way one-shot accuracy: per episode, n_way classes with >= 2 images each give one
    support and one query image; a query is right when its most similar support is its own.

    Returns None (not an error) when fewer than n_way classes have two images, so small
    validation splits simply skip the figure.
    """
    emb, labels = _check_one_shot(emb, labels, n_way, episodes, metric)
    order, _, starts, counts = class_blocks(labels)
    eligible = np.flatnonzero(counts >= 2)
    if len(eligible) < n_way:
        return None
    hits = _episodes_hits(emb, order, starts, counts, [eligible], n_way, episodes, seed, metric)
    return int(hits.sum()) / (episodes * n_way)


def _check_one_shot(emb: np.ndarray, labels: np.ndarray, n_way: int, episodes: int,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The arguments every one-shot figure shares, checked: (emb, labels) as arrays."""
    check_metric(metric)
    emb, labels = check_labelled(emb, labels)
    if not isinstance(n_way, (int, np.integer)) or n_way < 2:
        raise ConfigError(f"n_way must be an integer >= 2, got {n_way!r}")
    if not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise ConfigError(f"episodes must be a positive integer, got {episodes!r}")
    return emb, labels


def _episodes_hits(emb: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                   pools: list[np.ndarray], n_way: int, episodes: int, seed: int,
                   metric: str) -> np.ndarray:  # fmt: skip
    """Right answers per pool over `episodes` one-shot episodes, episode e drawing its n_way
    class blocks from `pools[e % len(pools)]` (one pool: any class; one per group: within)."""
    x = l2_normalize(emb) if metric == "cosine" else emb
    rng = np.random.default_rng(seed)
    hits = np.zeros(len(pools), dtype=np.int64)
    for e0 in range(0, episodes, 256):
        pool_of = (e0 + np.arange(min(256, episodes - e0))) % len(pools)
        picked = np.stack([rng.choice(pools[p], n_way, replace=False) for p in pool_of])
        np.add.at(hits, pool_of, _one_shot_hits(x, order, starts, counts, picked, rng, metric))
    return hits


def _one_shot_hits(x: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                   picked: np.ndarray, rng: np.random.Generator,
                   metric: str) -> np.ndarray:  # fmt: skip
    """Right answers of each one-shot episode: `picked` (episodes, n_way) class blocks, one
    random support and another random query image of each; a query is right when its most
    similar support is its own class's (a tie goes to the first support)."""
    s = rng.integers(0, counts[picked])
    q = rng.integers(0, counts[picked] - 1)
    q = q + (q >= s)
    support = x[order[starts[picked] + s]]  # (n_ep, n_way, dim)
    query = x[order[starts[picked] + q]]
    sim = np.einsum("eqd,esd->eqs", query, support)
    if metric == "l2":  # negative squared distance; the query's own norm does not rank
        sim = 2 * sim - np.einsum("esd,esd->es", support, support)[:, None, :]
    return (sim.argmax(axis=2) == np.arange(picked.shape[1])).sum(axis=1)


def one_shot_groups(labels: np.ndarray, groups: np.ndarray, n_way: int) -> list[Any]:
    """The groups (parent folders) holding `n_way` or more classes with 2 images each: those
    a within-group N-way episode can be drawn from. `groups[i]` is image i's group."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if groups.shape != labels.shape:
        raise DataError(f"{len(groups)} group names for {len(labels)} labels")
    classes, counts = np.unique(labels, return_counts=True)
    group_of = {c: groups[np.flatnonzero(labels == c)[0]] for c in classes[counts >= 2]}
    per_group: dict[Any, int] = {}
    for g in group_of.values():
        per_group[g] = per_group.get(g, 0) + 1
    return sorted((g for g, n in per_group.items() if n >= n_way), key=str)


def one_shot_within(
    emb: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    n_way: int,
    episodes: int = 500,
    seed: int = 0,
    metric: str = "cosine",
) -> tuple[float, dict[str, float]] | None:
    """N-way one-shot accuracy with every episode's classes from one group (`groups[i]` is
    image i's parent folder: one alphabet of Omniglot): the standard protocol for nested data,
    harder than drawing classes from anywhere, since sibling classes look alike. Episodes
    take the eligible groups (`one_shot_groups`) in turn, so each weighs the same, and
    otherwise run as in `one_shot_accuracy`.

    Returns (accuracy, {group: accuracy over its own episodes}): the groups differ widely (one
    alphabet's characters are far more alike than another's), which is what makes one split
    of a few groups score unlike another. None when no group has `n_way` classes."""
    emb, labels = _check_one_shot(emb, labels, n_way, episodes, metric)
    eligible_groups = one_shot_groups(labels, groups, n_way)
    if not eligible_groups:
        return None
    groups = np.asarray(groups)
    order, _, starts, counts = class_blocks(labels)
    block_group = groups[order[starts]]
    members = [np.flatnonzero((block_group == g) & (counts >= 2)) for g in eligible_groups]
    hits = _episodes_hits(emb, order, starts, counts, members, n_way, episodes, seed, metric)
    queries = np.bincount(np.arange(episodes) % len(members), minlength=len(members)) * n_way
    per_group = {str(g): int(h) / int(t) for g, h, t in zip(eligible_groups, hits, queries,
                                                             strict=True) if t}  # fmt: skip
    return int(hits.sum()) / (episodes * n_way), per_group
