"""`model.crop_mode: auto`: the eval geometry chosen on the validation images before training,
written into the run's config and best.pt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mltrain.config import load_config
from mltrain.inference.embedder import embedder_from_checkpoint
from mltrain.train import geometry, loaders
from mltrain.train import run as trainer
from tests.conftest import TINY_RUN, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def write_banded_portraits(root, classes: int = 8, per_class: int = 6, middle: bool = False):
    """Portraits (32 wide, 64 high) whose class shows only in the top and bottom quarters; the
    middle half is noise alike for every class. A center crop of the shorter side keeps just
    that middle, so only the whole image squashed can tell the classes apart. With `middle`
    the other way round: the class fills the middle half, which a center crop keeps alone,
    and squashing adds the noise bands."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for j in range(per_class):
            pixels = rng.integers(0, 256, (64, 32, 3))
            if middle:
                pixels[16:48] = colour
            else:
                pixels[:16] = colour
                pixels[48:] = colour
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{j}.png")
    return root


def run_auto(tmp_path, root, best_metric: str = "map_at_r"):
    cfg = load_config("configs/siamese.yaml", [
        *TINY_RUN, f"data.root={root}", f"output_dir={tmp_path / 'exp'}", "train.epochs=1",
        "eval.batch_size=16", "train.figures_every=0", "train.whiten=off", "data.augment=[]",
        "data.split=class_disjoint", "data.train_fraction=0.75", "data.val_fraction=0.25",
        f"train.best_metric={best_metric}", "model.crop_mode=auto"])  # fmt: skip
    return trainer.fit(cfg)


def test_auto_squashes_images_whose_class_a_center_crop_would_cut_off(tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    computed = []
    compute = loaders.compute_prefix
    monkeypatch.setattr(loaders, "compute_prefix",
                        lambda *a: computed.append(a[-1]) or compute(*a))  # fmt: skip
    run_dir = run_auto(tmp_path, write_banded_portraits(tmp_path / "data"))
    err = capsys.readouterr().err
    assert "model.crop_mode auto: squash" in err
    # each geometry's held-out prefix once: the training run reads the winner's from the cache
    assert computed.count("caching validation prefix") == 2, computed
    assert "crop_mode: squash" in (run_dir / "config.yaml").read_text()
    assert "model.crop_mode auto: squash" in (run_dir / "notes.txt").read_text()
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["config"]["model"]["crop_mode"] == "squash"
    embedder = embedder_from_checkpoint(str(run_dir / "checkpoints" / "best.pt"))
    assert embedder.dcfg["crop_mode"] == "squash"  # evaluate, export and search embed so too


def test_auto_keeps_the_center_crop_where_the_class_is_in_the_middle(tmp_path, capsys):
    """The other way round, chosen on a lower-is-better metric."""
    run_dir = run_auto(tmp_path, write_banded_portraits(tmp_path / "data", middle=True), "eer")
    err = capsys.readouterr().err
    assert "model.crop_mode auto: center (untrained model's validation eer" in err
    assert "crop_mode: center" in (run_dir / "config.yaml").read_text()


def test_square_images_are_not_embedded_twice(tmp_path, monkeypatch, capsys):
    root = write_image_folder(tmp_path / "data", classes=8, per_class=6, size=(32, 32))
    monkeypatch.setattr(geometry, "heldout_batches", lambda *a, **k: pytest.fail("embedded"))
    run_dir = run_auto(tmp_path, root)
    assert "crop_mode: center" in (run_dir / "config.yaml").read_text()
    assert "model.crop_mode auto: center (the images are square" in capsys.readouterr().err
    assert "images are square" in (run_dir / "notes.txt").read_text()  # said, not silent


def test_all_square_reads_headers(tmp_path):
    square = write_image_folder(tmp_path / "a", classes=1, per_class=3, size=(20, 20))
    paths = sorted(square.rglob("*.*"))
    assert geometry.all_square(paths)
    wide = write_image_folder(tmp_path / "b", classes=1, per_class=1, size=(30, 20))
    assert not geometry.all_square(paths + sorted(wide.rglob("*.*")))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert not geometry.all_square(paths + [broken])


def test_an_untrained_backbone_embeds_auto_with_its_own_geometry():
    from mltrain.config import ModelConfig
    from mltrain.model.network import build_model, data_config

    cfg = ModelConfig(backbone="test_efficientnet", pretrained=False, image_size=32,
                      crop_mode="auto")  # fmt: skip
    assert data_config(build_model(cfg), cfg)["crop_mode"] == "center"


def test_evaluating_an_untrained_backbone_with_auto_says_which_geometry(tmp_path, capsys):
    from mltrain.evaluation.evaluate import evaluate
    from tests.conftest import tiny_embedder

    root = write_image_folder(tmp_path / "data", classes=3, per_class=4)
    embedder = tiny_embedder(root)
    embedder.cfg.model.crop_mode = "auto"
    embedder.cfg.eval.tsne = False
    out = tmp_path / "eval"
    out.mkdir()
    evaluate(embedder, out, "backbone")
    assert "model.crop_mode auto: the backbone's own geometry" in capsys.readouterr().err
    assert "crop_mode auto" in (out / "report.md").read_text()
