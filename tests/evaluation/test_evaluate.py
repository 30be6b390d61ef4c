"""evaluate.py end to end on a tiny trained checkpoint, and its error cases."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mltrain.config import load_config
from mltrain.errors import CheckpointError, ConfigError, DataError
from mltrain.evaluation.evaluate import evaluate
from mltrain.files import atomic_save
from mltrain.inference.embedder import embedder_from_backbone, embedder_from_checkpoint
from mltrain.model.checkpoint import load_checkpoint
from mltrain.train import run as trainer
from tests.conftest import TINY_EMBED, TINY_RUN, write_image_folder

REPO = Path(__file__).resolve().parents[2]
SMALL_EVAL = [
    "eval.index_types=[flat, hnsw]",
    "eval.pca_lengths=[4, 8]",
    "eval.verification_pairs=200",
    "eval.one_shot_episodes=20",
    "eval.one_shot_ways=[2, 3]",
    "eval.tsne_max_points=60",
    "eval.ks=[1, 5]",
]
TINY = [*TINY_RUN, "eval.batch_size=32", *SMALL_EVAL]
TINY_EVAL = [*TINY_EMBED, "eval.batch_size=32", *SMALL_EVAL]  # evaluate refuses train.* keys


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    root = write_image_folder(tmp / "data", classes=4, per_class=14)
    cfg = load_config(REPO / "configs/triplet.yaml",
                      [*TINY, f"data.root={root}", f"output_dir={tmp / 'exp'}", "train.epochs=1"])
    return trainer.fit(cfg), root


def test_checkpoint_evaluation_writes_every_figure(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "eval"
    out.mkdir()
    result = evaluate(embedder_from_checkpoint(run_dir / "checkpoints/best.pt"), out, "test")
    m = json.loads((out / "metrics.json").read_text())
    for key in ("precision_at_1", "precision_at_5", "recall_at_5", "map_at_r", "r_precision",
                "mean_per_class_precision_at_1", "num_queries", "embedding_dim"):
        assert key in m, key
    assert m["num_queries"] == 28  # half of 4 x 14 held out
    assert m["embedding_dim"] == 1280
    assert set(m["verification"]) >= {"roc_auc", "eer", "tar_at_far_1e-2", "tar_at_far_1e-3",
                                      "best_threshold", "best_accuracy"}
    assert set(m["one_shot"]) == {"2", "3"}
    assert set(m["pca"]) == {"4", "8", "1280"}
    assert {row["kind"] for row in m["indexes"]} == {"flat", "hnsw"}
    assert set(m["per_class"]) == {f"class_{i}" for i in range(4)}
    assert m["precision_at_1"] == pytest.approx(result.metrics["precision_at_1"])
    for name in ("report.md", "roc.png", "pca.png", "queries.png", "split.json"):
        assert (out / name).is_file(), name
    assert not (out / "tsne.png").exists()  # 28 points: under TSNE_MIN_POINTS, said in `skipped`
    assert "t-SNE" in m["skipped"], m["skipped"]
    assert np.load(out / "heldout_embeddings.npy").shape == (28, 1280)


def test_evaluation_is_the_training_runs_own_heldout_figure(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "e"
    out.mkdir()
    embedder = embedder_from_checkpoint(run_dir / "checkpoints/last.pt", ["eval.tsne=false"])
    result = evaluate(embedder, out, "test")
    history = load_checkpoint(run_dir / "checkpoints/last.pt")["state"]["history"]
    assert result.metrics["precision_at_1"] == pytest.approx(history[-1]["precision_at_1"])


def test_book_protocol_with_split_none(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=8)
    cfg = load_config(REPO / "configs/pooling.yaml",
                      [*TINY, f"data.root={root}", "data.split=none", "eval.tsne=false"])
    out = tmp_path / "book"
    out.mkdir()
    m = evaluate(embedder_from_backbone(cfg), out, "backbone").metrics
    assert m["num_queries"] == 24  # every image queries all the others
    assert 0.0 <= m["book_accuracy"] <= 1.0


def test_cli_backbone_mode_prints_summary(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=8)
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--backbone", "tf_efficientnet_lite0",
           "--config", str(REPO / "configs/pooling.yaml"), "--out", str(tmp_path / "o")]
    for s in [*TINY_EVAL, f"data.root={root}", "eval.tsne=false"]:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision@1" in done.stdout
    ver = json.loads((tmp_path / "o" / "metrics.json").read_text())["verification"]
    assert f"EER {ver['eer']:.4f}  ROC AUC {ver['roc_auc']:.4f}" in done.stdout


def test_not_a_checkpoint_is_refused_without_traceback(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    done = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(bogus)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "bogus.pt" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(CheckpointError):
        embedder_from_checkpoint(bogus)


def test_checkpoint_whose_config_no_longer_validates(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    ckpt = load_checkpoint(run_dir / "checkpoints/last.pt")
    ckpt["config"]["train"]["retired_option"] = 1
    atomic_save(ckpt, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match="retired_option"):
        embedder_from_checkpoint(tmp_path / "old.pt")


def test_checkpoint_weights_that_do_not_fit(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    ckpt = load_checkpoint(run_dir / "checkpoints/last.pt")
    ckpt["model"]["neck.weight"] = torch.zeros(3, 3)
    atomic_save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        embedder_from_checkpoint(tmp_path / "bad.pt")


def test_single_class_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=["only", "other"], per_class=6)
    cfg = load_config(REPO / "configs/pooling.yaml",
                      [*TINY, f"data.root={root}", "data.exclude_classes=[other]"])
    with pytest.raises(DataError, match="class"):
        evaluate(embedder_from_backbone(cfg), tmp_path, "backbone")


def test_empty_heldout_split_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=1)
    cfg = load_config(REPO / "configs/pooling.yaml", [*TINY, f"data.root={root}"])
    with pytest.raises(DataError, match="empty"):
        evaluate(embedder_from_backbone(cfg), tmp_path, "backbone")


def test_a_changed_folder_cannot_score_the_runs_training_images_as_held_out(
    tiny_run, tmp_path, capsys
):
    """One class folder added to a copy of the data makes a re-split put 13 of the run's
    training images among the 43 "held-out" ones; they move to the training side with a note,
    for evaluate and export alike."""
    import shutil

    from mltrain.commands.evaluate import main as evaluate_main
    from mltrain.commands.export import main as export_main
    from tests.conftest import write_image_folder as write

    run_dir, root = tiny_run
    trained = {p for p, _ in json.loads((run_dir / "split.json").read_text())["train"]}
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    write(tmp_path / "extra", classes=1, per_class=6, size=(40, 36))  # not copies of class_0
    shutil.copytree(tmp_path / "extra" / "class_0", copy / "a_new_class")  # sorts first
    sets = ["--set", f"data.root={copy}", "--set", "eval.tsne=false"]
    best = run_dir / "checkpoints" / "best.pt"
    note = re.compile(
        rf"note: (\d+) of the 31 held-out images trained (\S+) \(its {run_dir}/split.json lists "
        r"them, e\.g\. class_\d/img_\d+\.\w+\): the folder or the split differs from the "
        r"run's, so they are left out of the held-out images; (\d+) remain$", re.M)
    for main, ckpt, extra in [(evaluate_main, run_dir, ["--out", str(tmp_path / "e")]),
                              (export_main, best, ["--out", str(tmp_path / "b")])]:  # fmt: skip
        main(["--checkpoint", str(ckpt), *extra, *sets])
        found = note.search(capsys.readouterr().err)
        assert found and found[2] == str(ckpt), found
        moved, left = int(found[1]), int(found[3])
        assert moved > 0 and moved + left == 31
    held = json.loads((tmp_path / "e" / "split.json").read_text())["heldout"]
    assert len(held) == left and not trained & {p for p, _ in held}  # no trained image scored
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_queries"] == left
    assert "left out of the held-out images" in (tmp_path / "e" / "report.md").read_text()
    # Moved rows may bring classes the re-split left without training images: mapped too
    from mltrain.config import load_config
    from mltrain.data.pipeline import prepare_data, trained_on, without_rows

    data = prepare_data(load_config(None, [f"data.root={copy}", "data.split=class_disjoint",
                                           "data.train_fraction=0.5"]))  # fmt: skip
    grown = without_rows(data, trained_on(run_dir / "split.json", data.split, data.folder))
    assert len(grown.train_labels) == len(grown.split.train)
    assert len(grown.train_classes) > len(data.train_classes)
    # Other data that reuses the file names (class_0/img_000.jpg, other bytes) is not the run's
    other = write(tmp_path / "other", classes=4, per_class=16, size=(44, 30))  # re-split
    evaluate_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "other_eval"),
                   "--set", f"data.root={other}", "--set", "eval.tsne=false"])  # fmt: skip
    assert "note:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "other_eval" / "metrics.json").read_text())["num_queries"] == 32
    # Every image by request (split none): the note only.
    evaluate_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "ok"),
                   "--set", "eval.tsne=false", "--set", "data.split=none"])  # fmt: skip
    assert "note: 28 of the 56 images trained" in capsys.readouterr().err
    assert (tmp_path / "ok" / "metrics.json").is_file()
