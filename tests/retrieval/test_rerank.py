"""Re-ranking: the formulas by hand, and sets whose re-ranked order is known."""

from __future__ import annotations

import numpy as np
import pytest

from mltrain.errors import ConfigError
from mltrain.evaluation.rerank_eval import rerank_comparison
from mltrain.retrieval.rerank import alpha_qe, k_reciprocal, rerank_candidates, reranked_order


def unit(*angles_deg: float) -> np.ndarray:
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_alpha_qe_by_hand():
    x = unit(0, 10, 90)
    y = alpha_qe(x, k=2, alpha=2.0)
    want0 = x[0] + np.cos(np.radians(10)) ** 2 * x[1]  # itself (sim 1) and its nearest other
    np.testing.assert_allclose(y[0], want0 / np.linalg.norm(want0), atol=1e-6)
    want2 = x[2] + np.cos(np.radians(80)) ** 2 * x[1]
    np.testing.assert_allclose(y[2], want2 / np.linalg.norm(want2), atol=1e-6)
    np.testing.assert_allclose(alpha_qe(x, k=1), x, atol=1e-6)  # k=1: every row itself


def test_k_reciprocal_with_lambda_one_is_the_original_ranking():
    x = unit(0, 7, 15, 40, 41, 90)
    assert (reranked_order(x, "k_reciprocal", k1=3, k2=1, lam=1.0)
            == reranked_order(x, "none")).all()  # fmt: skip


def test_two_clusters_rank_their_own_members_first():
    """Clusters at 0 and 60 degrees, with a member of each straying toward the other: plain
    cosine gives the two strays each other as nearest; alpha-QE/DBA pulls each toward its
    own cluster, so every row ranks its 4 own members first. k-reciprocal keeps the strays
    paired (they are each other's reciprocal neighbours) but fixes the rest of their lists."""
    a = unit(-6, -3, 0, 3, 27)  # 27 is the A member that strays toward B
    b = unit(33, 57, 60, 63, 66)  # 33 strays toward A
    x = np.concatenate([a, b])
    labels = np.repeat([0, 1], 5)
    plain = reranked_order(x, "none")
    assert labels[plain[4, 0]] == 1 and labels[plain[5, 0]] == 0  # the strays' nearest: wrong
    qe = reranked_order(x, "alpha_qe", k=4, alpha=1.0)
    assert (labels[qe[:, :4]] == labels[:, None]).all()
    kr = reranked_order(x, "k_reciprocal", k1=4, k2=1, lam=0.3)
    assert kr[4, 0] == 5 and kr[5, 0] == 4  # the reciprocal pair stays first...
    assert (labels[kr[4, 1:5]] == 0).all() and (labels[kr[5, 1:5]] == 1).all()  # ...then own
    assert labels[plain[4, 4]] == 1 and labels[plain[5, 4]] == 0  # plain: the other cluster


def test_rerank_candidates_and_comparison():
    x = unit(0, 27, -3, 3, -6, 33, 57, 60, 63, 66)
    assert rerank_candidates(x[0], x[1:], "none").tolist() == list(range(9))
    moved = rerank_candidates(x[0], x[1:], "k_reciprocal")
    assert sorted(moved.tolist()) == list(range(9))  # a permutation of the candidates
    with pytest.raises(ConfigError, match="unknown re-ranker 'magic'"):
        reranked_order(x, "magic")
    dist = k_reciprocal(x, k1=3, k2=1)
    assert dist.shape == (10, 10) and np.isfinite(dist).all()
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 10)
    emb = unit(*(labels * 40 + rng.normal(0, 12, 40)))
    out = rerank_comparison(emb, labels)
    assert out["rows"] == 40 and set(out) == {"none", "k_reciprocal", "alpha_qe", "rows",
                                               "recommended"}  # fmt: skip
    assert out["recommended"] == "none"  # both lose MAP@R here
    assert out["k_reciprocal"]["map_at_r"] < out["none"]["map_at_r"]


@pytest.mark.parametrize("n, recommended", [(60, "none"), (200, "k_reciprocal")])
def test_a_reranker_is_recommended_only_for_a_gain_clear_of_the_noise(n, recommended):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(8), n // 8)
    out = rerank_comparison(unit(*(labels * 40 + rng.normal(0, 14, len(labels)))), labels)
    gains = {m: out[m]["map_at_r"] - out["none"]["map_at_r"] for m in ("k_reciprocal", "alpha_qe")}
    assert max(gains.values()) > 0.02  # over 2 points each time, above MIN_GAIN
    assert out["recommended"] == recommended  # on 60 queries within 2 standard errors: noise


def test_a_reranker_that_clearly_loses_the_first_hit_is_not_the_default(monkeypatch):
    """On digits k_reciprocal can gain 7 points of MAP@R but cost 10 of precision@1; bundles
    must not then answer worse by default. Hand-made orders over 5 classes x 8 (R = 7):
    'none' gets each first hit right and nothing of the next 6; k_reciprocal each first hit
    wrong and the 7 after it right; alpha_qe the first two right."""
    import mltrain.evaluation.rerank_eval as rerank_eval

    labels = np.repeat(np.arange(5), 8)
    same = [np.flatnonzero((labels == labels[q]) & (np.arange(40) != q)) for q in range(40)]
    other = [np.flatnonzero(labels != labels[q]) for q in range(40)]
    pairs = list(zip(same, other, strict=True))
    orders = {
        "none": [[s[0], *o[:6], *s[1:]] for s, o in pairs],
        "k_reciprocal": [[o[0], *s, *o[1:6]] for s, o in pairs],
        "alpha_qe": [[s[0], s[1], *o[:6], *s[2:]] for s, o in pairs],
    }
    monkeypatch.setattr(rerank_eval, "reranked_order", lambda x, m: np.array(orders[m]))
    out = rerank_comparison(np.eye(40, 8, dtype=np.float32), labels)
    assert out["none"]["map_at_r"] == pytest.approx(1 / 7)
    assert out["k_reciprocal"]["map_at_r"] == pytest.approx(
        (1 / 2 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 6 + 6 / 7) / 7)  # 0.63: the best MAP@R
    assert out["alpha_qe"]["map_at_r"] == pytest.approx(2 / 7)
    assert (out["none"]["precision_at_1"], out["k_reciprocal"]["precision_at_1"]) == (1.0, 0.0)
    assert out["recommended"] == "alpha_qe"  # the best MAP@R that keeps the first hit
