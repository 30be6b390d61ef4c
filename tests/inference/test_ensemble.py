"""Ensembles of trained runs: hand-computed embeddings, the one-split rule, and the command."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mltrain.config import Config, load_config
from mltrain.errors import ConfigError
from mltrain.inference.embedder import embedder_from_checkpoint
from mltrain.inference.ensemble import EnsembleEmbedder, check_shared_split
from mltrain.train import run as trainer
from tests.conftest import TINY_RUN, write_image_folder

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Fixed:
    """A member that returns fixed embeddings, whatever the paths."""

    rows: np.ndarray
    cfg: Config

    @property
    def embedding_dim(self) -> int:
        return self.rows.shape[1]

    def embed(self, paths, labels=None, desc=""):
        return self.rows


def test_ensemble_embedding_is_unit_members_concatenated_over_root_n():
    a = np.array([[3.0, 4.0], [0.0, 2.0]])  # unit rows: (0.6, 0.8), (0, 1)
    b = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # (1, 0, 0), (0, 0, 1)
    ens = EnsembleEmbedder([Fixed(a, Config()), Fixed(b, Config())])
    x = ens.embed([Path("p"), Path("q")])
    r = 1 / np.sqrt(2)
    expected = np.array([[0.6 * r, 0.8 * r, r, 0, 0], [0, r, 0, 0, r]])
    np.testing.assert_allclose(x, expected, atol=1e-7)
    assert ens.embedding_dim == 5
    # cosine of the ensemble = mean of the members' cosines: (0.8 + 0) / 2
    assert float(x[0] @ x[1]) == pytest.approx(0.4)


def test_an_ensemble_needs_two_members():
    with pytest.raises(ConfigError, match="at least 2 checkpoints"):
        EnsembleEmbedder([Fixed(np.eye(2), Config())])


def test_members_must_share_the_split():
    a, b = Config(), Config()
    b.data.split = "class_disjoint"
    with pytest.raises(ConfigError) as info:
        check_shared_split([("run_a", a), ("run_b", b)])
    assert str(info.value) == (
        "run_b: data.split is 'class_disjoint' but run_a has 'per_class'; an ensemble's runs "
        "must share one split (data.root, data.exclude_classes, data.class_depth, data.split, "
        "data.train_fraction, seed)"
    )
    b = Config()
    b.seed = 1
    with pytest.raises(ConfigError, match="run_b: seed is 1 but run_a has 0"):
        check_shared_split([("run_a", a), ("run_b", b)])


def test_a_relative_root_matches_the_same_folder_written_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = Config(), Config()
    a.data.root = "data"
    b.data.root = str(tmp_path / "data")
    b.data.augment = [{"name": "HorizontalFlip", "args": {}}]  # training-only: may differ
    check_shared_split([("a", a), ("b", b)])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A triplet run and a pooling run on one split of 3 classes x 8 images."""
    tmp = tmp_path_factory.mktemp("ens")
    root = write_image_folder(tmp / "data", classes=3, per_class=8)
    runs = []
    for name in ("triplet", "pooling"):
        cfg = load_config(REPO / f"configs/{name}.yaml",
                          [*TINY_RUN, f"data.root={root}", f"output_dir={tmp / 'exp'}",
                           "train.epochs=1", "eval.tsne=false"])  # fmt: skip
        runs.append(trainer.fit(cfg))
    return runs, root, tmp


SMALL = ["eval.tsne=false", "eval.index_types=[flat]", "eval.pca_lengths=[4]",
         "eval.verification_pairs=100", "eval.one_shot_episodes=10", "eval.one_shot_ways=[2]",
         "eval.ks=[1]", "eval.amp=off"]  # fmt: skip


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_evaluate_two_checkpoints_scores_the_averaged_similarities(two_runs, tmp_path, capsys):
    from mltrain.commands import evaluate

    (a, b), _, _ = two_runs
    out = tmp_path / "ens"
    evaluate.main(["--checkpoint", str(a), "--checkpoint", str(b), "--out", str(out),
                   *_sets(*SMALL)])  # fmt: skip
    assert "2560-d" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["embedding_dim"] == 2560
    assert m["source"] == f"ensemble of checkpoints {a}, {b}"
    got = np.load(out / "heldout_embeddings.npy")
    parts = []
    for run in (a, b):
        member = embedder_from_checkpoint(run, SMALL)
        data_paths = [Path(member.cfg.data.root) / p for p, _ in
                      json.loads((out / "split.json").read_text())["heldout"]]  # fmt: skip
        x = member.embed(data_paths)
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    np.testing.assert_allclose(got, np.hstack(parts) / np.sqrt(2), atol=1e-5)


def test_an_ensemble_is_refused_where_one_model_is_needed(two_runs, tmp_path):
    from mltrain.commands import evaluate, export

    (a, b), _, _ = two_runs
    with pytest.raises(ConfigError, match="--export takes one --checkpoint"):
        evaluate.main(["--checkpoint", str(a), "--checkpoint", str(b),
                       "--export", str(tmp_path / "bundle")])  # fmt: skip
    with pytest.raises(ConfigError, match="--checkpoint given 2 times; this command takes one"):
        export.main(["--checkpoint", str(a), "--checkpoint", str(b),
                     "--out", str(tmp_path / "bundle")])  # fmt: skip
    assert not (tmp_path / "bundle").exists()


def test_runs_on_different_splits_are_refused_before_embedding(two_runs, tmp_path):
    from mltrain.commands import evaluate

    (a, _), root, tmp = two_runs
    cfg = load_config(REPO / "configs/triplet.yaml",
                      [*TINY_RUN, f"data.root={root}", f"output_dir={tmp / 'exp2'}",
                       "train.epochs=1", "eval.tsne=false", "seed=3"])  # fmt: skip
    other = trainer.fit(cfg)
    with pytest.raises(ConfigError, match=f"{other}: seed is 3 but {a} has 0"):
        evaluate.main(["--checkpoint", str(a), "--checkpoint", str(other),
                       "--out", str(tmp_path / "e")])  # fmt: skip
    assert not (tmp_path / "e").exists()
