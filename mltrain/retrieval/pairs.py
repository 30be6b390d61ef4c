"""Genuine and impostor pairs, their similarities, and the threshold that keeps a false-accept
rate: what verification needs, shared by the evaluator (`mltrain.evaluation.metrics`) and by
bundles that verify (`mltrain.retrieval.verify`), so it sits below both."""

from __future__ import annotations

from typing import Any

import numpy as np

from mltrain.errors import ConfigError, DataError
from mltrain.inference.vectors import l2_normalize
from mltrain.retrieval.index import check_metric


def plain(x: Any) -> Any:
    """Python scalar for messages: `3`, not `np.int64(3)`."""
    return x.item() if isinstance(x, np.generic) else x


def class_blocks(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by class: (order, class of each sorted position, block starts, block sizes)."""
    order = np.argsort(labels, kind="stable")
    _, starts, inverse, counts = np.unique(
        labels[order], return_index=True, return_inverse=True, return_counts=True
    )
    return order, inverse, starts, counts


def distinct_pairs(labels: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor) counts of the distinct unordered pairs that `labels` allow."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    genuine = int((counts * (counts - 1) // 2).sum())
    n = int(counts.sum())
    return genuine, n * (n - 1) // 2 - genuine


def _all_genuine(order: np.ndarray, starts: np.ndarray, counts: np.ndarray):
    parts = [np.triu_indices(c, 1) for c in counts]
    i = np.concatenate([order[s + a] for s, (a, _) in zip(starts, parts, strict=True)])
    j = np.concatenate([order[s + b] for s, (_, b) in zip(starts, parts, strict=True)])
    return i, j


def _all_impostor(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(len(labels), 1)
    keep = labels[i] != labels[j]
    return i[keep], j[keep]


def _subset(rng, i: np.ndarray, j: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    pick = rng.choice(len(i), min(n, len(i)), replace=False)
    return i[pick], j[pick]


def sample_pairs(
    labels: np.ndarray, num_pairs: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced pairs `(i, j, same)`: num_pairs // 2 genuine (same class, i != j), rest impostor.

    Where a kind has fewer than 4x the requested distinct pairs (small sets), its pairs are
    drawn without replacement and capped at the distinct pairs that exist, so 30 images never
    pretend to give 20,000 pairs. Otherwise genuine anchors are drawn uniformly over images of
    classes with >= 2 images (large classes give more pairs, like a real gallery), partners
    and impostors uniformly, with replacement. Genuine first. Same seed, same pairs.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError("labels are empty; sample pairs from a split that has images")
    if not isinstance(num_pairs, (int, np.integer)) or num_pairs < 2:
        raise ConfigError(f"num_pairs must be an integer >= 2, got {num_pairs!r}")
    order, cls, starts, counts = class_blocks(labels)
    if len(counts) < 2:
        raise DataError(
            f"labels have a single class ({plain(labels[0])!r}); impostor pairs need two classes"
        )
    eligible = np.flatnonzero(counts[cls] >= 2)
    if not len(eligible):
        raise DataError("every class has one image, so there are no genuine pairs")
    rng = np.random.default_rng(seed)
    n_gen = num_pairs // 2
    n_imp = num_pairs - n_gen
    genuine, impostor = distinct_pairs(labels)

    if genuine < 4 * n_gen:
        gi, gj = _subset(rng, *_all_genuine(order, starts, counts), n_gen)
    else:
        a = rng.choice(eligible, n_gen)
        c = cls[a]
        r = rng.integers(0, counts[c] - 1)  # a different member of the block: skip a's own slot
        b = starts[c] + r + (r >= a - starts[c])
        gi, gj = order[a], order[b]

    if impostor < 4 * n_imp:
        ii, ij = _subset(rng, *_all_impostor(labels), n_imp)
    else:
        a = rng.integers(0, len(labels), n_imp)
        c = cls[a]
        r = rng.integers(0, len(labels) - counts[c])  # any position outside a's class block
        b = np.where(r < starts[c], r, r + counts[c])
        ii, ij = order[a], order[b]

    same = np.concatenate([np.ones(len(gi), bool), np.zeros(len(ii), bool)])
    return np.concatenate([gi, ii]), np.concatenate([gj, ij]), same


def pair_scores(
    emb: np.ndarray, i: np.ndarray, j: np.ndarray, metric: str = "cosine", chunk: int = 65536
) -> np.ndarray:
    """Similarity of each pair: cosine similarity (kept within [-1, 1]: fp32 rounding puts an
    image with itself at 1.0000005), or negative L2 distance (higher = closer)."""
    check_metric(metric)
    x = l2_normalize(emb) if metric == "cosine" else np.asarray(emb, dtype=np.float32)
    out = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), chunk):
        a, b = x[i[s : s + chunk]], x[j[s : s + chunk]]
        if metric == "cosine":
            out[s : s + chunk] = np.clip(np.einsum("nd,nd->n", a, b), -1.0, 1.0)
        else:
            out[s : s + chunk] = -np.linalg.norm(a - b, axis=1)
    return out


def calibrate_threshold(same: np.ndarray, scores: np.ndarray, far: float) -> dict[str, Any]:
    """The lowest score threshold whose false-accept rate on these pairs is at most `far`
    (accept a pair when score >= threshold), with the FAR and TAR it reaches on them.

    With n impostor pairs, a FAR of `far` allows floor(far * n) false accepts: the threshold
    lies just above the impostor score ranked one past those, so ties never let more in.
    Fewer than 1 / far impostors allow none, and the threshold lies above every impostor.
    """
    same = np.asarray(same, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 < far < 1:
        raise ConfigError(f"far must be between 0 and 1, got {far!r}")
    impostor = np.sort(scores[~same])[::-1]
    genuine = scores[same]
    if not len(impostor) or not len(genuine):
        raise DataError("calibration needs both same-class and different-class pairs")
    allowed = int(np.floor(far * len(impostor)))  # < len(impostor), as far < 1
    threshold = float(np.nextafter(impostor[allowed], np.inf))
    return {
        "threshold": threshold,
        "far": float(far),
        "achieved_far": float((impostor >= threshold).mean()),
        "tar": float((genuine >= threshold).mean()),
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
    }
