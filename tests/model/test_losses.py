"""Losses and miners by name, nested components, and hand-checked loss values."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers
from torch import nn

from mltrain.errors import ConfigError
from mltrain.model.losses import LOSSES, MINERS, Criterion, build_criterion


def crit(loss, miner=None, num_classes=3, embedding_dim=2, has_head=False) -> Criterion:
    if isinstance(loss, str):
        loss = {"name": loss, "args": {}}
    return build_criterion(loss, miner, num_classes, embedding_dim, has_head)


# --- registries -------------------------------------------------------------------------------


def pml_classes(module, base) -> set[str]:
    return {
        n
        for n, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, base) and not n.startswith("Base")
    }


def test_every_pml_loss_is_registered():
    expected = pml_classes(losses, losses.BaseMetricLossFunction)
    assert {
        "ContrastiveLoss",
        "TripletMarginLoss",
        "ArcFaceLoss",
        "MultiSimilarityLoss",
        "ProxyAnchorLoss",
        "NTXentLoss",
        "SupConLoss",
        "CircleLoss",
    } <= expected
    assert expected <= set(LOSSES.names())
    assert "cross_entropy" in LOSSES
    assert LOSSES.get("cross_entropy") is nn.CrossEntropyLoss
    assert LOSSES.get("TripletMarginLoss") is losses.TripletMarginLoss


def test_every_pml_miner_is_registered():
    expected = pml_classes(miners, miners.BaseMiner)
    assert {"TripletMarginMiner", "MultiSimilarityMiner", "BatchHardMiner"} <= expected
    assert expected <= set(MINERS.names())


@pytest.mark.parametrize("kind, name", [("loss", "TripletLoss"), ("miner", "HardMiner")])
def test_unknown_names_list_valid_ones(kind, name):
    with pytest.raises(ConfigError) as info:
        if kind == "loss":
            crit(name)
        else:
            crit("TripletMarginLoss", {"name": name, "args": {}})
    msg = str(info.value)
    assert f"unknown {kind} '{name}'" in msg
    assert ("TripletMarginLoss" if kind == "loss" else "TripletMarginMiner") in msg
    if kind == "loss":
        assert "cross_entropy" in msg


# --- head / logits rules ----------------------------------------------------------------------


def test_cross_entropy_needs_head():
    with pytest.raises(ConfigError, match="model.head: true"):
        crit("cross_entropy", has_head=False)


def test_head_with_metric_loss_is_error():
    with pytest.raises(ConfigError, match="only for train.loss cross_entropy, not ContrastiveLoss"):
        crit("ContrastiveLoss", has_head=True)


def test_miner_with_cross_entropy_is_error():
    with pytest.raises(ConfigError, match="miner"):
        crit("cross_entropy", {"name": "BatchHardMiner", "args": {}}, has_head=True)


def test_cross_entropy_uses_head_logits():
    c = crit({"name": "cross_entropy", "args": {}}, has_head=True)
    assert c.uses_logits and c.miner is None
    head = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    emb = torch.tensor([[math.log(2.0), 0.0]])
    # logits [ln 2, 0, 0] -> softmax [2/4, 1/4, 1/4]
    loss = c(emb, torch.tensor([0]), head)
    assert loss.item() == pytest.approx(-math.log(0.5), abs=1e-6)
    loss = c(emb, torch.tensor([2]), head)
    assert loss.item() == pytest.approx(-math.log(0.25), abs=1e-6)


def test_cross_entropy_args_passed():
    c = crit({"name": "cross_entropy", "args": {"label_smoothing": 0.1}}, has_head=True)
    assert c.loss.label_smoothing == pytest.approx(0.1)


def test_bad_loss_or_miner_args_name_the_component_and_what_it_takes():
    with pytest.raises(ConfigError) as info:
        crit({"name": "TripletMarginLoss", "args": {"no_such_arg": 1}})
    assert str(info.value).startswith("train.loss.args: TripletMarginLoss: ")
    assert str(info.value).endswith(
        "'no_such_arg'; it takes margin, swap, smooth_loss, triplets_per_anchor"
    )
    miner = {"name": "TripletMarginMiner", "args": {"margn": 0.2}}  # a typo
    with pytest.raises(ConfigError) as info:
        build_criterion({"name": "TripletMarginLoss"}, miner, 5, 16, False)
    assert str(info.value).startswith("train.miner.args: TripletMarginMiner: ")
    assert str(info.value).endswith("'margn'; it takes margin, type_of_triplets")


# --- nested components and filled sizes -------------------------------------------------------


def test_nested_distance_shorthand_and_mapping():
    c = crit({"name": "ContrastiveLoss", "args": {"distance": "CosineSimilarity"}})
    assert isinstance(c.loss.distance, distances.CosineSimilarity)
    c = crit(
        {
            "name": "TripletMarginLoss",
            "args": {
                "distance": {"name": "LpDistance", "args": {"p": 1, "normalize_embeddings": False}},
                "reducer": {"name": "MeanReducer"},
            },
        }
    )
    assert isinstance(c.loss.distance, distances.LpDistance)
    assert c.loss.distance.p == 1 and c.loss.distance.normalize_embeddings is False
    assert isinstance(c.loss.reducer, reducers.MeanReducer)


def test_nested_distance_in_miner():
    c = crit(
        "TripletMarginLoss",
        {"name": "TripletMarginMiner", "args": {"margin": 0.3, "distance": "CosineSimilarity"}},
    )
    assert isinstance(c.miner, miners.TripletMarginMiner)
    assert c.miner.margin == pytest.approx(0.3)
    assert isinstance(c.miner.distance, distances.CosineSimilarity)


def test_unknown_nested_distance_lists_names():
    with pytest.raises(ConfigError, match="unknown distance 'Cosine'.*CosineSimilarity"):
        crit({"name": "ContrastiveLoss", "args": {"distance": "Cosine"}})


def test_arcface_gets_sizes_filled():
    c = crit("ArcFaceLoss", num_classes=7, embedding_dim=5)
    assert c.loss.num_classes == 7
    assert tuple(c.loss.W.shape) == (5, 7)
    # explicit args win over the filled ones
    c = crit({"name": "ArcFaceLoss", "args": {"num_classes": 4}}, num_classes=7, embedding_dim=5)
    assert tuple(c.loss.W.shape) == (5, 4)


def test_sizes_not_passed_to_losses_that_do_not_take_them():
    c = crit("ContrastiveLoss", num_classes=7, embedding_dim=5)  # would be TypeError otherwise
    assert isinstance(c.loss, losses.ContrastiveLoss)


# --- values on hand-made batches --------------------------------------------------------------


def test_contrastive_loss_by_hand():
    c = crit({"name": "ContrastiveLoss", "args": {"pos_margin": 0, "neg_margin": 1}})
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    # Euclidean distances: d01 = sqrt(0.16 + 0.64) = sqrt(0.8), d02 = sqrt(2),
    # d12 = sqrt(0.36 + 0.04) = sqrt(0.4).
    # positive pairs (0,1),(1,0): loss d01 each -> mean over non-zero = sqrt(0.8)
    # negative pairs: relu(1 - sqrt 2) = 0 twice, 1 - sqrt(0.4) twice -> the reducer averages
    # only the non-zero ones: 1 - sqrt(0.4)
    expected = math.sqrt(0.8) + 1 - math.sqrt(0.4)
    loss = c(emb, labels, None)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # a plain mean over all four negative pairs would differ
    assert abs(loss.item() - (math.sqrt(0.8) + (1 - math.sqrt(0.4)) / 2)) > 0.1
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_contrastive_loss_zero_when_pairs_satisfied():
    c = crit({"name": "ContrastiveLoss", "args": {"pos_margin": 0, "neg_margin": 1}})
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # negatives 2 apart > margin
    assert c(emb, torch.tensor([0, 0, 1]), None).item() == pytest.approx(0.0, abs=1e-6)


def test_triplet_with_miner_finite_loss_and_gradient():
    torch.manual_seed(0)
    c = crit(
        {"name": "TripletMarginLoss", "args": {"margin": 0.2}},
        {"name": "TripletMarginMiner", "args": {"margin": 0.2, "type_of_triplets": "all"}},
        embedding_dim=8,
    )
    assert isinstance(c.miner, miners.TripletMarginMiner) and not c.uses_logits
    emb = torch.randn(8, 8, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    a, p, n = c.miner(emb, labels)
    assert len(a) > 0
    assert bool((labels[a] == labels[p]).all()) and bool((labels[a] != labels[n]).all())
    loss = c(emb, labels, None)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_triplet_loss_by_hand_single_triplet():
    c = crit({"name": "TripletMarginLoss", "args": {"margin": 0.5}})
    # anchor (1,0), positive (0,1), negative (0.6,0.8) -> d_ap = sqrt 2, d_an = sqrt 0.8
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1])
    tuples = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    loss = c.loss(emb, labels, tuples)
    assert loss.item() == pytest.approx(math.sqrt(2) - math.sqrt(0.8) + 0.5, abs=1e-5)


# --- cross-batch memory ---------------------------------------------------------------------


def test_cross_batch_memory_wraps_a_loss_and_its_miner():
    spec = {
        "name": "CrossBatchMemory",
        "args": {
            "loss": {"name": "ContrastiveLoss", "args": {"neg_margin": 0.8}},
            "memory_size": 20,
            "miner": "MultiSimilarityMiner",
        },
    }
    crit = build_criterion(spec, None, num_classes=3, embedding_dim=8, has_head=False)
    assert crit.loss.embedding_size == 8  # filled from the model
    assert type(crit.loss.loss).__name__ == "ContrastiveLoss"
    assert type(crit.loss.miner).__name__ == "MultiSimilarityMiner"
    torch.manual_seed(0)
    for _ in range(3):
        emb = torch.randn(8, 8, requires_grad=True)
        crit(emb, torch.tensor([0, 0, 1, 1, 2, 2, 0, 1]), None).backward()
        assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert crit.loss.has_been_filled and crit.loss.queue_idx == 4  # 24 rows through 20 slots
    with pytest.raises(ConfigError, match="move the miner into train.loss.args.miner"):
        build_criterion(spec, {"name": "MultiSimilarityMiner"}, 3, 8, False)


def test_arguments_of_the_wrong_type_or_value_fail_when_built_not_at_the_first_step():
    triplet, miner = {"name": "TripletMarginLoss"}, {"name": "TripletMarginMiner"}
    with pytest.raises(ConfigError, match=r"^train.loss.args: the loss cannot score .*TypeError"):
        build_criterion({**triplet, "args": {"margin": "abc"}}, None, 3, 8, False)
    with pytest.raises(ConfigError, match=r"train.miner.args: the loss cannot score"):
        build_criterion(triplet, {**miner, "args": {"margin": "abc"}}, 3, 8, False)
    with pytest.raises(ConfigError, match=r"train.miner.args.type_of_triplets must be one of "
                                          r"all, hard, semihard, easy, got 'bogus'"):
        build_criterion(triplet, {**miner, "args": {"type_of_triplets": "bogus"}}, 3, 8, False)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_criterion(triplet, {**miner, "args": {"type_of_triplets": "semihard"}}, 3, 8, False)
    assert torch.equal(torch.rand(3), expected)  # the check leaves the run's random stream alone


# --- BNNeck hybrid --------------------------------------------------------------------------


def test_bnneck_hybrid_adds_label_smoothed_cross_entropy_by_hand():
    torch.manual_seed(0)
    head = nn.Linear(4, 3, bias=False)
    emb, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    triplet = {"name": "TripletMarginLoss", "args": {}}
    hybrid = build_criterion(triplet, None, 3, 4, has_head=True, hybrid=True)
    metric = losses.TripletMarginLoss()(emb, labels)
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)(head(emb), labels)
    assert hybrid(emb, labels, head).item() == pytest.approx((metric + ce).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="model.bnneck: true for a metric"):
        build_criterion(triplet, None, 3, 4, has_head=True)
