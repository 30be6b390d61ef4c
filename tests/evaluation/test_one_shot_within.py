"""One-shot episodes drawn within one parent folder (an alphabet of Omniglot), beside the
plain figure: the metric by hand, the plan, and the evaluator's metrics.json keys."""

from __future__ import annotations

import numpy as np
import pytest

from mltrain.config import load_config
from mltrain.errors import ConfigError, DataError
from mltrain.evaluation.evaluate import EmbeddedSplit, compute_metrics, parents_of
from mltrain.evaluation.plan import plan_evaluation
from mltrain.evaluation.verification import (
    one_shot_accuracy,
    one_shot_groups,
    one_shot_within,
)

# Two images per class. Parent A: classes 0 and 1 point different ways, so an episode within A
# is always right. Parent B: classes 2 and 3 are the same vector, so within B the tie goes to
# the first support: its query is right, the other one wrong (1 of 2).
A0, A1, B = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
EMB = np.array([A0, A0, A1, A1, B, B, B, B], dtype=np.float32)
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3])
PARENTS = np.array(["A", "A", "A", "A", "B", "B", "B", "B"], dtype=object)


def _accuracy(*args, **kwargs) -> float | None:
    """The whole figure of `one_shot_within`, without the per-parent ones."""
    out = one_shot_within(*args, **kwargs)
    return None if out is None else out[0]


def test_within_parent_episodes_take_the_parents_in_turn():
    # 4 episodes: A, B, A, B -> (2 + 1 + 2 + 1) / 8 right answers
    assert _accuracy(EMB, LABELS, PARENTS, 2, episodes=4) == 0.75
    # 3 episodes: A, B, A -> (2 + 1 + 2) / 6
    assert _accuracy(EMB, LABELS, PARENTS, 2, episodes=3) == pytest.approx(5 / 6)
    # no parent holds 3 classes
    assert _accuracy(EMB, LABELS, PARENTS, 3, episodes=4) is None
    # only B holds 2 classes when A's second class has a single image: every episode is B's
    one_image = np.array([0, 0, 1, 9, 2, 2, 3, 3])  # class 1 keeps one image, 9 another
    parents = np.array(["A", "A", "A", "C", "B", "B", "B", "B"], dtype=object)
    assert one_shot_groups(one_image, parents, 2) == ["B"]
    assert _accuracy(EMB, one_image, parents, 2, episodes=5) == 0.5
    # the plain 4-way figure: A's two queries right, one of B's two (3 of 4 per episode)
    assert one_shot_accuracy(EMB, LABELS, 4, episodes=7) == 0.75


def test_each_parent_is_scored_on_its_own_episodes():
    # 4 episodes: A, B, A, B -> A 4 of 4 right, B 2 of 4
    assert one_shot_within(EMB, LABELS, PARENTS, 2, episodes=4) == (0.75, {"A": 1.0, "B": 0.5})
    # 3 episodes: A, B, A -> A 4 of 4, B 1 of 2; the whole figure weighs A's two episodes
    assert one_shot_within(EMB, LABELS, PARENTS, 2, episodes=3) == (
        pytest.approx(5 / 6), {"A": 1.0, "B": 0.5})
    # 1 episode: B draws none and is left out rather than scored 0
    assert one_shot_within(EMB, LABELS, PARENTS, 2, episodes=1) == (1.0, {"A": 1.0})
    assert one_shot_within(EMB, LABELS, PARENTS, 3, episodes=4) is None


def test_within_parent_rejects_mismatched_groups():
    with pytest.raises(DataError, match="3 group names for 8 labels"):
        _accuracy(EMB, LABELS, PARENTS[:3], 2)


def plan(parents, setting="auto", ways=(2, 3)):
    e = load_config(None, [f"eval.one_shot_within={setting}",
                           f"eval.one_shot_ways={list(ways)}"]).eval  # fmt: skip
    return plan_evaluation(e, 8, LABELS, 3, 7, np.array(parents, dtype=object))


def test_the_plan_reports_within_parent_only_where_it_differs_and_fits():
    nested = plan(PARENTS)
    assert nested.one_shot_within_ways == [2]
    assert nested.skipped["3-way one-shot within one parent"] == (
        "no parent folder holds that many held-out classes with 2 images (at most 2)"
    )
    flat = plan([""] * 8)
    assert flat.one_shot_within_ways == [] and not any("parent" in k for k in flat.skipped)
    one_parent = ["A"] * 8  # the plain figure is already within it
    assert plan(one_parent).one_shot_within_ways == []
    assert plan(one_parent, "parent").one_shot_within_ways == [2, 3]
    assert plan(PARENTS, "none").one_shot_within_ways == []
    assert plan([""] * 8, "parent").skipped["one-shot within one parent"] == (
        "the held-out classes have no parent folders (one folder per class)"
    )


def test_the_setting_is_checked():
    with pytest.raises(ConfigError, match="eval.one_shot_within: 'alphabet' is not one of auto, "
                       "parent, none"):  # fmt: skip
        load_config(None, ["eval.one_shot_within=alphabet"])


def test_metrics_json_gets_within_parent_figures_beside_the_plain_ones():
    classes = ["A/c0", "A/c1", "B/c2", "B/c3"]
    np.testing.assert_array_equal(parents_of(classes, LABELS), PARENTS)
    assert list(parents_of(["s1", "s2"], np.array([1, 0]))) == ["", ""]
    cfg = load_config(None, ["eval.one_shot_ways=[2, 4]", "eval.one_shot_episodes=4",
                             "eval.rerank=false", "eval.pca_lengths=[2]",
                             "eval.index_types=[flat]", "eval.tsne=false"])  # fmt: skip
    split = EmbeddedSplit(classes, EMB, LABELS, [], EMB, LABELS, False)
    m = compute_metrics(split, cfg).metrics
    assert m["one_shot_within_parent"] == {"2": 0.75}
    assert m["one_shot_within_parent_by_group"] == {"2": {"A": 1.0, "B": 0.5}}
    assert set(m["one_shot"]) == {"2", "4"} and m["one_shot"]["4"] == 0.75
    assert "4-way one-shot within one parent" in m["skipped"]
    flat = EmbeddedSplit(["a", "b", "c", "d"], EMB, LABELS, [], EMB, LABELS, False)
    assert "one_shot_within_parent" not in compute_metrics(flat, cfg).metrics


def test_report_md_shows_the_within_parent_table_after_the_plain_one():
    from mltrain.evaluation.markdown import markdown_report

    base = {"one_shot": {"5": 0.9}, "per_class": {}, "worst_classes": [], "confused_pairs": []}
    text = markdown_report({**base, "one_shot_within_parent": {"5": 0.75}})
    plain, within = text.index("| 5-way | 0.9000 |"), text.index("| 5-way | 0.7500 |")
    assert plain < text.index("One-shot within one parent folder") < within
    assert "within one parent" not in markdown_report(base)
    groups = {"5": {"Balinese": 0.6, "Latin": 0.9}, "20": {"Balinese": 0.55}}
    text = markdown_report({**base, "one_shot_within_parent": {"5": 0.75, "20": 0.5},
                            "one_shot_within_parent_by_group": groups})  # fmt: skip
    assert text.index("| 20-way | 0.5000 |") < text.index("| parent | 5-way | 20-way |")
    assert "| Balinese | 0.6000 | 0.5500 |" in text and "| Latin | 0.9000 | n/a |" in text
