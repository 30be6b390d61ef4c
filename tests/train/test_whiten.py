"""The whitening fitted after the last epoch: kept in best.pt only when it beats best.pt on
the selection metric, and then applied by everything that rebuilds the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mltrain.config import load_config
from mltrain.inference.embedder import embedder_from_checkpoint
from mltrain.train import run as trainer
from mltrain.train import whiten
from tests.conftest import TINY_RUN, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def every_fit_wins(monkeypatch) -> None:
    """Every candidate beats the one before, whatever its precision@1 (no guard)."""
    monkeypatch.setattr(whiten, "better", lambda key, new, old: True)
    monkeypatch.setattr(whiten, "GUARD", "no_such_metric")


def test_a_whitening_chosen_on_another_metric_may_not_lower_precision_at_1():
    """On Caltech101 the candidate best on MAP@R cost 0.5 points of precision@1: a candidate
    that lowers best.pt's precision@1 is passed over, whatever its MAP@R."""
    base = ({"map_at_r": 0.84, "precision_at_1": 0.953}, None, False, 0)
    higher_but_worse_p1 = ({"map_at_r": 0.88, "precision_at_1": 0.948}, "a", False, 0)
    higher_same_p1 = ({"map_at_r": 0.86, "precision_at_1": 0.953}, "b", False, 0)
    assert whiten._pick("map_at_r", 0.953, base, higher_but_worse_p1) is base
    assert whiten._pick("map_at_r", 0.953, base, higher_same_p1) is higher_same_p1
    assert whiten._pick("map_at_r", 0.953, higher_same_p1, higher_but_worse_p1) is higher_same_p1
    # chosen on precision@1 itself, the metric alone decides
    p1 = ({"precision_at_1": 0.96}, "c", False, 0)
    assert whiten._pick("precision_at_1", 0.953, base, p1) is p1


def tiny_run(tmp_path, *extra: str):
    root = write_image_folder(tmp_path / "data", classes=6, per_class=6)
    cfg = load_config("configs/triplet.yaml", [
        *TINY_RUN, f"data.root={root}", f"output_dir={tmp_path / 'exp'}", "train.epochs=1",
        "eval.batch_size=16", "train.figures_every=0", "data.split=class_disjoint",
        "data.train_fraction=0.67", "data.val_fraction=0.34", *extra])  # fmt: skip
    run_dir = trainer.fit(cfg)
    return root, run_dir, torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)


def test_a_whitening_that_wins_is_saved_in_best_pt_and_applied_on_load(
    tmp_path, monkeypatch, capsys
):
    every_fit_wins(monkeypatch)  # every fit "wins"
    root, run_dir, best = tiny_run(tmp_path)
    matrix = best["model"]["whiten.matrix"]
    width, dims = matrix.shape
    assert best["best"]["whiten_dims"] == dims and dims <= min(width, 256)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["best"]["whiten_dims"] == dims
    assert "whiten.matrix" not in torch.load(run_dir / "checkpoints" / "last.pt",
                                             weights_only=True)["model"]  # fmt: skip
    err = capsys.readouterr().err
    assert "best.pt embeds through it" in err and "refitted with the" in err
    assert "; validation " in err  # the side that scored it, not the test side
    assert "best.pt embeds through it" in (run_dir / "notes.txt").read_text()  # kept with the run
    embedder = embedder_from_checkpoint(str(run_dir / "checkpoints" / "best.pt"))
    assert embedder.embedding_dim == dims
    emb = np.asarray(embedder.embed(sorted(root.rglob("*.png"))[:4]))
    assert emb.shape == (4, dims)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)


def test_a_whitening_that_loses_leaves_best_pt_as_it_was(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(whiten, "better", lambda key, new, old: False)
    _, run_dir, best = tiny_run(tmp_path)
    assert not any(k.startswith("whiten.") for k in best["model"])
    assert "whiten_dims" not in best["best"]
    assert "best.pt stays as it was" in capsys.readouterr().err


def test_off_fits_nothing(tmp_path, capsys):
    _, _, best = tiny_run(tmp_path, "train.whiten=off")
    assert not any(k.startswith("whiten.") for k in best["model"])
    assert "whitening:" not in capsys.readouterr().err


def test_training_rows_are_capped_evenly_across_classes():
    class Data:  # the two attributes training_rows reads
        class split:
            train = np.arange(100)

        class folder:
            labels = np.repeat([0, 1, 2, 3], 25)

    rows = whiten.training_rows(Data, seed=0, most=40)
    assert len(rows) == 40 and len(set(rows)) == 40
    assert np.bincount(Data.folder.labels[rows]).tolist() == [10, 10, 10, 10]
    assert whiten.training_rows(Data, seed=0, most=200).tolist() == list(range(100))


def test_mirror_averaging_that_wins_is_stored_in_best_pt_config(tmp_path, monkeypatch, capsys):
    every_fit_wins(monkeypatch)  # the last candidate wins
    root, run_dir, best = tiny_run(tmp_path)  # triplet.yaml flips images: mirrors are tried
    err = capsys.readouterr().err
    assert "and their mirror images" in err and "mirror averaging on" in err
    assert best["config"]["eval"]["flip_tta"] is True and best["best"]["flip_tta"] == 1.0
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["config"]["eval"]["flip_tta"] is False
    embedder = embedder_from_checkpoint(str(run_dir / "checkpoints" / "best.pt"))
    assert embedder.spec.flip


def test_no_mirrors_where_the_augmentation_does_not_flip(tmp_path, monkeypatch, capsys):
    every_fit_wins(monkeypatch)
    _, _, best = tiny_run(
        tmp_path, "data.augment=[{name: RandomResizedCrop, args: {scale: [0.6, 1.0]}}]"
    )
    assert "mirror" not in capsys.readouterr().err
    assert best["config"]["eval"]["flip_tta"] is False


def test_flips_images_reads_the_augmentation():
    def cfg(augment):
        return load_config("configs/triplet.yaml", [f"data.augment={json.dumps(augment)}"])

    assert whiten.flips_images(cfg([{"name": "HorizontalFlip"}]))
    assert whiten.flips_images(cfg([{"name": "HorizontalFlip", "args": {"p": 0.5}}]))
    assert not whiten.flips_images(cfg([{"name": "HorizontalFlip", "args": {"p": 0}}]))
    assert not whiten.flips_images(cfg([{"name": "VerticalFlip"}]))
    assert not whiten.flips_images(cfg([]))


def test_mirror_averaging_matches_the_flip_of_the_inference_path():
    from mltrain.inference.batching import embed_tensor
    from mltrain.model.network import build_model
    from mltrain.runtime import InferSpec

    cfg = load_config("configs/triplet.yaml", TINY_RUN)
    model = build_model(cfg.model).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    spec = InferSpec(torch.device("cpu"), None, False, 0, False, False)
    plain = embed_tensor(model, x, spec)
    mirror = embed_tensor(whiten.Mirrored(model), x, spec)
    np.testing.assert_allclose(mirror, embed_tensor(model, x.flip(3), spec), atol=1e-6)
    flipped = embed_tensor(model, x, InferSpec(torch.device("cpu"), None, False, 0, False, True))
    np.testing.assert_allclose(whiten.averaged(plain, mirror, model.normalize), flipped,
                               atol=1e-5)  # fmt: skip


def test_two_way_splits_never_fit_on_the_test_side(tmp_path, monkeypatch, capsys):
    every_fit_wins(monkeypatch)
    _, _, best = tiny_run(tmp_path, "data.val_fraction=0")  # two-way: held-out is the test side
    err = capsys.readouterr().err
    assert "best.pt embeds through it" in err and "refitted" not in err
    assert "; held-out " in err
    assert "whiten.matrix" in best["model"]


def test_a_kept_whitening_re_measures_the_verification_figures_training_measured(
    tmp_path, monkeypatch
):
    """best.pt's EER must describe the whitened model it embeds with, not the epoch before
    it: where training measured one (epochs that draw figures), the whitening measures it too."""
    from mltrain.train.heldout import HeldOut

    every_fit_wins(monkeypatch)
    asked = []
    score = HeldOut.score

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("with_verification", False))
        return score(self, *args, **kwargs)

    monkeypatch.setattr(HeldOut, "score", spy)
    _, _, best = tiny_run(tmp_path / "a", "train.figures_every=1", "train.eval_start=false")
    assert "eer" in best["best"] and asked[-1] is True
    asked.clear()
    _, _, best = tiny_run(tmp_path / "b")  # no figures drawn: no EER to keep current
    assert "eer" not in best["best"] and asked[-1] is False
