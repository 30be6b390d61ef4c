"""Retrieval and verification metrics on tiny inputs whose answers are computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mltrain.errors import ConfigError, DataError
from mltrain.evaluation.metrics import (
    book_accuracy,
    confused_pairs,
    map_at_r,
    mean_average_precision,
    mean_per_class_precision_at_1,
    num_relevant,
    per_class_metrics,
    precision_at_k,
    r_precision,
    recall_at_k,
    retrieval_metrics,
    score_neighbours,
    worst_classes,
)
from mltrain.evaluation.verification import one_shot_accuracy, roc_summary, verification_metrics
from mltrain.retrieval.index import knn_chunks
from mltrain.retrieval.pairs import calibrate_threshold, distinct_pairs, pair_scores, sample_pairs

# Neighbour labels for 3 queries of classes 0, 1, 2; hits are
# [[1, 0, 1], [1, 1, 0], [0, 0, 1]].
NN = np.array([[0, 1, 0], [1, 1, 0], [0, 1, 2]])
Q = np.array([0, 1, 2])
R = np.array([3, 3, 1])


def line_points(xs: list[float]) -> np.ndarray:
    """Points on the x axis, so L2 neighbours can be read off a number line."""
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


# Six points on a line, classes A=0 at x=0, 1, 10 and B=1 at x=3, 4, 11. Leave-one-out L2
# neighbour labels (best first):
#   x=0  (A): A B B A B     x=1 (A): A B B A B     x=3 (B): B A A A B
#   x=4  (B): B A A A B     x=10(A): B B B A A     x=11(B): A B B A A
LINE = line_points([0, 1, 3, 4, 10, 11])
LINE_Y = np.array([0, 0, 1, 1, 0, 1])


def test_precision_and_recall_at_k_by_hand():
    assert precision_at_k(NN, Q, 1) == pytest.approx(2 / 3)
    assert precision_at_k(NN, Q, 2) == pytest.approx(0.5)
    assert precision_at_k(NN, Q, 3) == pytest.approx(5 / 9)
    assert recall_at_k(NN, Q, 1) == pytest.approx(2 / 3)
    assert recall_at_k(NN, Q, 2) == pytest.approx(2 / 3)
    assert recall_at_k(NN, Q, 3) == pytest.approx(1.0)


def test_r_based_metrics_by_hand():
    # r_precision: top 3, 3, 1 -> 2/3, 2/3, 0.
    assert r_precision(NN, Q, R) == pytest.approx(4 / 9)
    # map_at_r: (1/1 + 2/3)/3, (1/1 + 2/2)/3, 0.
    assert map_at_r(NN, Q, R) == pytest.approx(11 / 27)
    # Whole list: row 3 also earns 1/3 for its hit at rank 3 (R = 1).
    assert mean_average_precision(NN, Q, R) == pytest.approx(14 / 27)


def test_queries_without_relevant_items_are_left_out():
    nn = np.vstack([NN, [[0, 0, 0]]])
    q = np.append(Q, 5)
    assert map_at_r(nn, q, np.append(R, 0)) == pytest.approx(11 / 27)
    with pytest.raises(DataError, match="num_relevant is 0"):
        r_precision(NN, Q, 0)


def test_k_beyond_retrieved_columns_is_config_error():
    with pytest.raises(ConfigError, match="k=4"):
        precision_at_k(NN, Q, 4)


def test_num_relevant_counts_gallery_class_minus_self():
    gallery = np.array([0, 0, 1, 2, 2, 2])
    assert num_relevant(np.array([2, 0, 7]), gallery).tolist() == [3, 2, 0]
    assert num_relevant(gallery, gallery, leave_one_out=True).tolist() == [1, 1, 0, 2, 2, 2]


def test_leave_one_out_retrieval_by_hand():
    scores, nb = retrieval_metrics(LINE, LINE_Y, metric="l2", ks=(1, 3))
    assert scores["precision_at_1"] == pytest.approx(4 / 6)
    assert scores["precision_at_3"] == pytest.approx(1 / 3)
    assert scores["recall_at_3"] == pytest.approx(5 / 6)
    assert scores["r_precision"] == pytest.approx(5 / 12)
    assert scores["map_at_r"] == pytest.approx(3 / 8)
    # R = 2 for everyone, so AP over the top R retrieved equals MAP@R here.
    assert scores["mean_average_precision"] == pytest.approx(3 / 8)
    assert scores["num_queries"] == 6 and scores["embedding_dim"] == 2
    # A query never retrieves itself, and the kept neighbours are the ones read off the line.
    assert not (nb.indices == np.arange(6)[:, None]).any()
    assert nb.indices[:, 0].tolist() == [1, 0, 3, 2, 5, 4]
    assert nb.labels.shape == (6, 5) and nb.scored.all()


def test_gallery_retrieval_by_hand_and_lone_query_skipped():
    queries = line_points([1.6, 10.4, 50.0])
    q_labels = np.array([0, 1, 2])  # class 2 is not in the gallery
    scores, nb = retrieval_metrics(queries, q_labels, LINE, LINE_Y, metric="l2", ks=(1, 2))
    # x=1.6 (A): A B A B A B;  x=10.4 (B): A B B B A A;  R = 3 for both.
    assert scores["precision_at_1"] == pytest.approx(0.5)
    assert scores["recall_at_2"] == pytest.approx(1.0)
    assert scores["r_precision"] == pytest.approx(2 / 3)
    assert scores["map_at_r"] == pytest.approx((5 / 9 + 7 / 18) / 2)
    assert scores["num_queries"] == 2 and scores["num_lone_queries"] == 1
    assert nb.scored.tolist() == [True, True, False]


def test_cosine_and_l2_rank_differently():
    # Query (1, 0): (5, 0) is the same direction (cosine 1) but far; (1, 1) is close in L2.
    gallery = np.array([[5, 0], [1, 1], [-1, 0], [-1, -0.5]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    query = np.array([[1, 0]], dtype=np.float32)
    cos, _ = retrieval_metrics(query, [0], gallery, labels, metric="cosine", ks=(1,))
    l2, _ = retrieval_metrics(query, [0], gallery, labels, metric="l2", ks=(1,))
    assert cos["precision_at_1"] == 1.0
    assert l2["precision_at_1"] == 0.0


def test_book_accuracy_by_hand_keeps_lone_classes():
    # Top-4 hits per point: 2, 2, 1, 1, 1, 2 (of 4) -> 9/24.
    assert book_accuracy(LINE, LINE_Y, k=4) == pytest.approx(3 / 8)
    # A far-away singleton class scores 0 and changes nobody's top 4: 9/4 over 7 images.
    emb = np.vstack([LINE, line_points([100])])
    assert book_accuracy(emb, np.append(LINE_Y, 2), k=4) == pytest.approx(9 / 28)


def test_book_accuracy_uses_l2_not_cosine():
    # All four points share a direction, so cosine ranking would be a tie; L2 is not.
    emb = line_points([1, 2, 10, 11])
    assert book_accuracy(emb, np.array([0, 0, 1, 1]), k=1) == 1.0


PER_CLASS_NN = np.array(
    [
        [0, 0, 1, 1, 1],  # cat: p@1 1, p@5 2/5
        [1, 0, 0, 0, 0],  # cat: p@1 0, p@5 4/5
        [1, 1, 1, 0, 2],  # dog: p@1 1, p@5 3/5
        [1, 2, 2, 2, 2],  # eel: p@1 0, p@5 4/5
        [1, 1, 1, 1, 1],  # cat: p@1 0, p@5 0
    ]
)
PER_CLASS_Q = np.array([0, 0, 1, 2, 0])
NAMES = ["cat", "dog", "eel"]


def test_per_class_views_by_hand():
    per_class = per_class_metrics(PER_CLASS_NN, PER_CLASS_Q, NAMES)
    assert per_class["cat"] == pytest.approx(
        {"precision_at_1": 1 / 3, "precision_at_5": 0.4, "num_queries": 3}
    )
    assert per_class["dog"] == pytest.approx(
        {"precision_at_1": 1.0, "precision_at_5": 0.6, "num_queries": 1}
    )
    assert per_class["eel"]["precision_at_5"] == pytest.approx(0.8)
    assert mean_per_class_precision_at_1(per_class) == pytest.approx(4 / 9)
    assert worst_classes(per_class, n=2) == [("eel", 0.0), ("cat", pytest.approx(1 / 3))]
    assert confused_pairs(PER_CLASS_NN, PER_CLASS_Q, NAMES) == [
        ("cat", "dog", 2),
        ("eel", "dog", 1),
    ]


def test_per_class_needs_five_neighbours_and_known_names():
    with pytest.raises(ConfigError, match="k=5"):
        per_class_metrics(NN, Q, NAMES)
    with pytest.raises(DataError, match="label 3"):
        per_class_metrics(PER_CLASS_NN, np.array([0, 0, 1, 3, 0]), NAMES)


def test_retrieval_neighbours_feed_per_class_without_a_second_search():
    _, nb = retrieval_metrics(LINE, LINE_Y, metric="l2", ks=(1,))
    per_class = per_class_metrics(nb.labels[nb.scored], nb.query_labels[nb.scored], ["A", "B"])
    # Top-1 correct for x=0, 1 (A) and x=3, 4 (B); wrong for x=10 and x=11.
    assert per_class["A"]["precision_at_1"] == pytest.approx(2 / 3)
    assert per_class["B"]["precision_at_5"] == pytest.approx(2 / 5)
    assert confused_pairs(nb.labels, nb.query_labels, ["A", "B"]) == [
        ("A", "B", 1),
        ("B", "A", 1),
    ]


@pytest.mark.parametrize(
    ("emb", "labels", "message"),
    [
        (np.zeros((0, 4)), np.array([]), "empty"),
        (np.ones((3, 4)), np.array([0, 1]), "3 embeddings but 2 labels"),
        (np.eye(4), np.zeros(4), "single class"),
        (np.full((2, 2), np.nan), np.array([0, 1]), "NaN"),
    ],
)
def test_bad_inputs_are_data_errors(emb, labels, message):
    for fn in (retrieval_metrics, book_accuracy, verification_metrics):
        with pytest.raises(DataError, match=message):
            fn(emb, labels)


def test_k_larger_than_gallery_is_config_error():
    with pytest.raises(ConfigError, match="k=10.*only 5"):
        retrieval_metrics(LINE, LINE_Y, ks=(1, 10))
    with pytest.raises(ConfigError, match="k=6 exceeds the gallery size 6"):
        book_accuracy(LINE, LINE_Y, k=6)
    with pytest.raises(ConfigError, match="cosine, l2"):
        retrieval_metrics(LINE, LINE_Y, metric="dot")


def test_agrees_with_pytorch_metric_learning():
    calc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((120, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 120)
    query = rng.standard_normal((30, 8)).astype(np.float32)
    q_labels = rng.integers(0, 6, 30)  # class 5 has no gallery items: lone queries
    calc = calc_mod.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    cases = [
        (calc.get_accuracy(emb, labels), retrieval_metrics(emb, labels, metric="l2", ks=(1,))),
        (
            calc.get_accuracy(query, q_labels, emb, labels),
            retrieval_metrics(query, q_labels, emb, labels, metric="l2", ks=(1,)),
        ),
    ]
    for ref, (ours, _) in cases:
        assert ours["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
        assert ours["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)
        assert ours["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)


def test_sample_pairs_capped_at_the_distinct_pairs_of_a_small_set():
    labels = np.array([0, 0, 0, 1, 1, 2])  # class 2 has one image: never in a genuine pair
    assert distinct_pairs(labels) == (3 + 1, 15 - 4)  # C(3,2) + C(2,2) genuine of C(6,2)
    i, j, same = sample_pairs(labels, 1001, seed=3)
    assert same.sum() == 4 and (~same).sum() == 11
    pairs = {tuple(sorted(p)) for p in zip(i.tolist(), j.tolist(), strict=True)}
    assert len(pairs) == 15  # every distinct pair once
    assert (labels[i[same]] == labels[j[same]]).all() and (
        labels[i[~same]] != labels[j[~same]]
    ).all()
    i, j, same = sample_pairs(labels, 6, seed=3)  # fewer requested than exist: no repeats
    assert same.sum() == 3 and (~same).sum() == 3
    assert len({tuple(sorted(p)) for p in zip(i.tolist(), j.tolist(), strict=True)}) == 6


def test_sample_pairs_balanced_valid_and_seeded():
    labels = np.repeat(np.arange(40), 30)[:-29]  # class 39 has one image: never genuine
    i, j, same = sample_pairs(labels, 1001, seed=3)
    assert same.sum() == 500 and (~same).sum() == 501
    assert (labels[i[same]] == labels[j[same]]).all() and (i[same] != j[same]).all()
    assert not np.isin(labels[i[same]], [39]).any()
    assert (labels[i[~same]] != labels[j[~same]]).all()
    again = sample_pairs(labels, 1001, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((i, j, same), again, strict=True))
    assert not np.array_equal(i, sample_pairs(labels, 1001, seed=4)[0])


def test_sample_pairs_needs_genuine_and_impostor_candidates():
    with pytest.raises(DataError, match="no genuine pairs"):
        sample_pairs(np.array([0, 1, 2]), 10, seed=0)
    with pytest.raises(DataError, match="single class"):
        sample_pairs(np.array([4, 4, 4]), 10, seed=0)


def test_pair_scores_by_hand():
    emb = np.array([[1, 0], [0, 2], [3, 4]], dtype=np.float32)
    i, j = np.array([0, 0]), np.array([1, 2])
    assert pair_scores(emb, i, j, "cosine") == pytest.approx([0.0, 0.6])
    assert pair_scores(emb, i, j, "l2") == pytest.approx([-np.sqrt(5), -np.sqrt(20)])


def test_roc_summary_by_hand():
    same = np.array([True, True, True, False, False, False])
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    out = roc_summary(same, scores)
    assert out["roc_auc"] == pytest.approx(8 / 9)  # 8 of 9 genuine/impostor pairs ordered
    assert out["eer"] == pytest.approx(1 / 3)  # at threshold 0.7: FAR 1/3, FRR 1/3
    assert out["tar_at_far_1e-2"] == pytest.approx(2 / 3)
    assert out["best_accuracy"] == pytest.approx(5 / 6)
    assert out["best_threshold"] == pytest.approx(0.8)
    assert out["fpr"][0] == 0.0 and out["tpr"][-1] == 1.0


def separable(per_class: int = 10, classes: int = 4, dim: int = 8, seed: int = 0):
    """Tight clusters around orthogonal axes: any sane metric is perfect on them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    emb = np.eye(dim, dtype=np.float32)[labels] + 0.01 * rng.standard_normal(
        (len(labels), dim)
    ).astype(np.float32)
    return emb, labels


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_verification_perfectly_separable(metric):
    emb, labels = separable()
    out = verification_metrics(emb, labels, metric=metric, num_pairs=400, seed=1)
    assert out["roc_auc"] == 1.0 and out["eer"] == 0.0
    assert out["tar_at_far_1e-3"] == 1.0 and out["best_accuracy"] == 1.0
    assert out["num_pairs"] == 180 + 200  # 4 x C(10, 2) genuine pairs exist, 200 impostors asked
    assert (out["num_genuine"], out["num_impostor"]) == (180, 200)
    if metric == "cosine":  # genuine ~ 1, impostor ~ 0: the threshold lies in between
        assert 0.0 < out["best_threshold"] <= 1.0 + 1e-6


def test_one_shot_separable_and_too_few_classes():
    emb, labels = separable(per_class=3, classes=6)
    assert one_shot_accuracy(emb, labels, n_way=5, episodes=40) == 1.0
    assert one_shot_accuracy(emb, labels, n_way=5, episodes=40, metric="l2") == 1.0
    # Only classes 0-2 have two images: a 5-way episode cannot be drawn.
    assert one_shot_accuracy(emb[:9], labels[:9], n_way=5) is None
    with pytest.raises(ConfigError, match="n_way"):
        one_shot_accuracy(emb, labels, n_way=1)


def test_one_shot_random_embeddings_near_chance():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((200, 16)).astype(np.float32)
    labels = np.repeat(np.arange(20), 10)
    acc = one_shot_accuracy(emb, labels, n_way=10, episodes=100, seed=0)
    assert 0.0 < acc < 0.25  # chance is 0.1


def test_chunked_scoring_matches_one_chunk():
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((40, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 40)
    whole, nb = retrieval_metrics(emb, labels, ks=(1, 5))
    relevant = num_relevant(labels, labels, leave_one_out=True)
    chunks = knn_chunks(emb, emb, whole["search_k"], exclude_self=True, chunk_size=7)
    parts, nb_parts = score_neighbours(chunks, labels, labels, relevant, (1, 5), keep=10)
    for key in ("precision_at_5", "recall_at_5", "r_precision", "map_at_r"):
        assert parts[key] == pytest.approx(whole[key])
    np.testing.assert_array_equal(nb_parts.indices, nb.indices)


def test_calibrated_threshold_reproduces_its_far_on_its_pairs():
    rng = np.random.default_rng(0)
    same = np.r_[np.ones(300, bool), np.zeros(2000, bool)]
    scores = np.r_[rng.normal(0.8, 0.1, 300), rng.normal(0.2, 0.15, 2000)]
    for far in (1e-1, 1e-2, 1e-3):
        cal = calibrate_threshold(same, scores, far)
        accepted = scores[~same] >= cal["threshold"]
        assert accepted.mean() == cal["achieved_far"] <= far
        assert accepted.sum() == int(far * 2000)  # continuous scores: exactly the allowance
        assert cal["tar"] == (scores[same] >= cal["threshold"]).mean()
        lower = np.nextafter(cal["threshold"], -np.inf)  # any lower threshold breaks the FAR
        assert (scores[~same] >= lower).mean() > far or far * 2000 < 1


def test_calibration_by_hand_with_ties():
    same = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.7, 0.0])
    cal = calibrate_threshold(same, scores, 0.25)  # 5 impostors allow 1 false accept...
    assert cal["threshold"] > 0.7 and cal["achieved_far"] == 0.0  # ...but two tie at 0.7
    assert cal["tar"] == pytest.approx(2 / 3)
    assert calibrate_threshold(same, scores, 0.5)["threshold"] == pytest.approx(0.2, abs=1e-9)


def test_map_looks_past_r_to_the_largest_classs_r_and_equals_map_at_r_for_equal_classes():
    """Points on the unit circle (degrees): A = 0, 10, 100; B = 25, 110. By hand, MAP@R per
    query is 0.5, 0.5, 0, 0, 0 (mean 0.2). mAP reads the first R_max = 2 results: b2's only
    classmate is second (1/2), so 0.5, 0.5, 0, 0, 0.5 (mean 0.3). With a3 gone every R is 1
    and the two coincide."""
    from mltrain.evaluation.metrics import retrieval_metrics

    def circle(degrees):
        rad = np.deg2rad(degrees)
        return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)

    emb, labels = circle([0, 10, 100, 25, 110]), np.array([0, 0, 0, 1, 1])
    m, _ = retrieval_metrics(emb, labels, metric="cosine", ks=(1,))
    assert m["map_at_r"] == pytest.approx(0.2)
    assert m["mean_average_precision"] == pytest.approx(0.3)
    keep = [0, 1, 3, 4]
    m, _ = retrieval_metrics(emb[keep], labels[keep], metric="cosine", ks=(1,))
    assert m["mean_average_precision"] == pytest.approx(m["map_at_r"])


def test_the_verification_note_counts_each_kind_of_pair_as_it_was_drawn():
    """On 150 digits (10 classes x 15) the note must not read "1050 genuine + 10000 impostor
    pairs, all the distinct pairs", since 10,125 impostor pairs exist: 125 fall to the cap."""
    from mltrain.evaluation.plan import EvalPlan, _plan_pairs

    plan = EvalPlan(ks=[1], pca_lengths=[], index_types=[], verification_pairs=0,
                    one_shot_ways=[], tsne=False)  # fmt: skip
    _plan_pairs(plan, 20000, np.repeat(np.arange(10), 15))  # 10 x C(15, 2) = 1,050 genuine
    assert plan.notes == [
        "verification: all 1,050 genuine pairs and 10,000 of the 10,125 impostor pairs the "
        "held-out images allow (20000 requested in eval.verification_pairs, half of each kind)"
    ]
