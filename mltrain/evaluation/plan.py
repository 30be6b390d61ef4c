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
from mltrain.retrieval.index import INDEX_TYPES, check_index_config
from mltrain.retrieval.pairs import distinct_pairs

TSNE_MIN_POINTS = 10


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

    def skip(self, what: str, reason: str) -> None:
        self.skipped[what] = reason
        self.notes.append(f"{what} skipped: {reason}")


def _list(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def usable_ks(ks: list[int], available: int) -> list[int]:
    """The ks a gallery of `available` retrievable items can fill (at least k=1)."""
    return [k for k in ks if k <= available] or [1]


def plan_evaluation(
    e: EvalConfig, n_train: int, heldout_labels: np.ndarray, dim: int, gallery_rows: int
) -> EvalPlan:
    """Fit `e` to `n_train` PCA-fitting rows, the held-out labels (the queries, also the index
    gallery and the pairs' source), `dim`-long embeddings and `gallery_rows` retrievable items."""
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
