"""What an evaluation can measure on data of a given size, decided before any image is embedded.

Every figure of the report has a size it needs: a PCA length needs as many training rows, an
IVF-PQ index enough rows to train its codebooks, N-way one-shot N classes, verification pairs
that exist. The plan fits the configured evaluation to the data (counts and embedding length
are known before embedding) and says what it skipped or adapted and why, so a 60-image folder
gets a report with notes instead of an error after all the embedding work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mltrain.config import EvalConfig
from mltrain.errors import ConfigError
from mltrain.retrieval.index_types import INDEX_TYPES, check_index_config
from mltrain.retrieval.pairs import distinct_pairs

# Below this many points a t-SNE picture is mostly its own randomness: none is drawn.
TSNE_MIN_POINTS = 50


@dataclass
class EvalPlan:
    """The evaluation that fits the data; `skipped` maps a figure to the reason it is absent."""

    ks: list[int]
    pca_lengths: list[int]
    index_types: list[str]
    verification_pairs: int  # 0: verification skipped
    one_shot_ways: list[int]
    tsne: bool
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # N-way one-shot with each episode's classes from one parent folder (eval.one_shot_within)
    one_shot_within_ways: list[int] = field(default_factory=list)

    def skip(self, what: str, reason: str) -> None:
        self.skipped[what] = reason
        self.notes.append(f"{what} skipped: {reason}")


def _list(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def usable_ks(ks: list[int], available: int) -> list[int]:
    """The ks a gallery of `available` retrievable items can fill (at least k=1)."""
    return [k for k in ks if k <= available] or [1]


def plan_evaluation(
    e: EvalConfig, n_train: int, heldout_labels: np.ndarray, dim: int, gallery_rows: int,
    parents: np.ndarray | None = None,
) -> EvalPlan:
    """Fit `e` to `n_train` PCA-fitting rows, the held-out labels (the queries, also the index
    gallery and the pairs' source), `dim`-long embeddings and `gallery_rows` retrievable items.
    `parents`: each held-out image's parent folder ("" for a top-level class), for one-shot
    episodes within one parent."""
    labels = np.asarray(heldout_labels)
    plan = EvalPlan(usable_ks(e.ks, gallery_rows), [], [], 0, [], e.tsne)
    dropped = [k for k in e.ks if k not in plan.ks]
    if dropped:
        plan.skip(
            f"precision@{_list(dropped)}", f"the gallery has {gallery_rows} retrievable items"
        )
    _plan_pca(plan, e.pca_lengths, n_train, dim)
    _plan_indexes(plan, e, len(labels), dim)
    _plan_pairs(plan, e.verification_pairs, labels)
    _plan_one_shot(plan, e.one_shot_ways, labels)
    if parents is not None:
        _plan_one_shot_within(plan, e, labels, np.asarray(parents))
    if e.tsne and len(labels) < TSNE_MIN_POINTS:
        plan.tsne = False
        plan.skip("t-SNE", f"{len(labels)} held-out points (needs {TSNE_MIN_POINTS})")
    return plan


def _plan_pca(plan: EvalPlan, lengths: list[int], n_train: int, dim: int) -> None:
    limit = min(n_train, dim)
    plan.pca_lengths = [n for n in lengths if n <= limit]
    too_long = [n for n in lengths if n > limit and n < dim]  # >= dim is the full length anyway
    if too_long:
        plan.skip(
            f"PCA lengths {_list(too_long)}",
            f"longer than min({n_train} training rows, {dim} dimensions) = {limit}",
        )


def _plan_indexes(plan: EvalPlan, e: EvalConfig, rows: int, dim: int) -> None:
    unknown = [k for k in e.index_types if k not in INDEX_TYPES]
    if unknown:
        raise ConfigError(
            f"eval.index_types: unknown {unknown}; valid names: {', '.join(INDEX_TYPES.names())}"
        )
    for kind in e.index_types:
        try:
            note = check_index_config(kind, rows, dim, e.metric)
        except ConfigError as err:  # too few rows for this index: skip it, say why
            plan.skip(f"index {kind}", str(err))
            continue
        plan.index_types.append(kind)
        if note:
            plan.notes.append(f"index {kind}: {note}")


def _plan_pairs(plan: EvalPlan, requested: int, labels: np.ndarray) -> None:
    genuine, impostor = distinct_pairs(labels)
    if genuine == 0 or impostor == 0:
        plan.skip("verification", "the held-out set needs a class with 2 images and 2 classes")
        return
    n_gen, n_imp = min(requested // 2, genuine), min(requested - requested // 2, impostor)
    plan.verification_pairs = requested
    if n_gen + n_imp < requested:
        plan.notes.append(
            f"verification: {_pairs(n_gen, genuine, 'genuine')} and "
            f"{_pairs(n_imp, impostor, 'impostor')} the held-out images allow ({requested} "
            "requested in eval.verification_pairs, half of each kind)"
        )


def _pairs(n: int, total: int, kind: str) -> str:
    return f"all {n:,} {kind} pairs" if n == total else f"{n:,} of the {total:,} {kind} pairs"


def _plan_one_shot(plan: EvalPlan, ways: list[int], labels: np.ndarray) -> None:
    _, counts = np.unique(labels, return_counts=True)
    eligible = int((counts >= 2).sum())
    plan.one_shot_ways = [n for n in ways if n <= eligible]
    too_many = [n for n in ways if n > eligible]
    if too_many:
        plan.skip(
            f"{_list(too_many)}-way one-shot",
            f"only {eligible} held-out classes have the 2 images an episode needs",
        )


def _plan_one_shot_within(plan: EvalPlan, e: EvalConfig, labels: np.ndarray,
                          parents: np.ndarray) -> None:  # fmt: skip
    """One-shot with each episode's classes from one parent folder. `auto`: where the
    held-out classes sit in two or more parents (one parent for all would repeat the plain
    figure); `parent`: wherever classes have a parent. Either way for the ways some parent
    can fill (N classes with the 2 images an episode needs)."""
    if e.one_shot_within == "none":
        return
    classes, counts = np.unique(labels, return_counts=True)
    per_parent: dict[str, int] = {}
    for c in classes[counts >= 2]:
        parent = str(parents[np.flatnonzero(labels == c)[0]])
        per_parent[parent] = per_parent.get(parent, 0) + 1
    if not any(per_parent.keys() - {""}):
        if e.one_shot_within == "parent":
            plan.skip("one-shot within one parent",
                      "the held-out classes have no parent folders (one folder per class)")
        return
    if e.one_shot_within == "auto" and len(per_parent) < 2:
        return
    most = max(per_parent.values())
    plan.one_shot_within_ways = [n for n in e.one_shot_ways if n <= most]
    too_many = [n for n in e.one_shot_ways if n > most]
    if too_many:
        plan.skip(
            f"{_list(too_many)}-way one-shot within one parent",
            f"no parent folder holds that many held-out classes with 2 images (at most {most})",
        )
