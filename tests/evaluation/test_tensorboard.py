"""TensorBoard events of training and evaluation, read back as TensorBoard reads them: one
x-axis (the global optimizer step), hparams and text summaries, and an evaluated checkpoint
landing on its own training curve with the same value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from mltrain.config import load_config
from mltrain.evaluation.evaluate import evaluate
from mltrain.inference.batching import extract_embeddings
from mltrain.inference.embedder import embedder_from_checkpoint
from mltrain.model.checkpoint import load_checkpoint
from mltrain.train import run as trainer
from tests.conftest import TINY_RUN, write_image_folder

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
# 4 classes x 8 images, half held out: 16 training images, 2 optimizer steps per epoch.
STEPS_PER_EPOCH = 2
MAX_STEPS = 5  # stops inside epoch 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def text(acc: EventAccumulator, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def hparams(acc: EventAccumulator) -> dict[str, HParamsPluginData]:
    content = acc.PluginTagToContent("hparams")
    return {tag: HParamsPluginData.FromString(blob) for tag, blob in content.items()}


@pytest.fixture(scope="module")
def train_py_run(tmp_path_factory) -> Path:
    """`python train.py ... --set train.max_steps=5`, as a user runs it."""
    tmp = tmp_path_factory.mktemp("tb")
    root = write_image_folder(tmp / "data", classes=4, per_class=8)
    sets = [*TINY_RUN, "train.epochs=3", f"train.max_steps={MAX_STEPS}", "eval.batch_size=16",
            f"data.root={root}", f"output_dir={tmp / 'exp'}", *SMALL_EVAL]
    cmd = [sys.executable, "train.py", "--config", "configs/triplet.yaml"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "MLTRAIN_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_train_loss_has_one_point_per_optimizer_step(train_py_run: Path) -> None:
    acc = events(train_py_run)
    assert steps(acc, "train/loss") == list(range(1, MAX_STEPS + 1))
    assert steps(acc, "train/lr") == list(range(1, MAX_STEPS + 1))
    assert all(e.value > 0 for e in acc.Scalars("train/lr"))


def test_epoch_tags_and_heldout_sit_at_global_steps(train_py_run: Path) -> None:
    acc = events(train_py_run)
    ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, MAX_STEPS]  # epochs 1, 2 and the cut-off 3
    for tag in ("train/loss_epoch", "train/images_per_s", "train/epoch",
                "heldout/roc_auc", "heldout/eer"):
        assert steps(acc, tag) == ends, tag
    for tag in ("heldout/precision_at_1", "heldout/map_at_r"):  # and the untrained start
        assert steps(acc, tag) == [0, *ends], tag
    assert [e.value for e in acc.Scalars("train/epoch")] == [1, 2, 3]
    ckpt = load_checkpoint(train_py_run / "checkpoints" / "last.pt")
    history = ckpt["state"]["history"]
    assert [h["step"] for h in history] == ends
    logged = [e.value for e in acc.Scalars("heldout/precision_at_1")]
    assert logged[0] == pytest.approx(ckpt["start"]["precision_at_1"], abs=1e-6)
    assert logged[1:] == pytest.approx([h["precision_at_1"] for h in history], abs=1e-6)
    # per-epoch means stay off train/loss, whose points are the steps' own losses
    assert [e.value for e in acc.Scalars("train/loss_epoch")] == pytest.approx(
        [h["loss"] for h in history], abs=1e-5
    )
    best = json.loads((train_py_run / "metrics.json").read_text())["best"]
    assert acc.Scalars("best/precision_at_1")[-1].value == pytest.approx(best["precision_at_1"])
    assert [e.step for e in acc.Tensors("heldout/verification_pr")] == ends
    assert [e.step for e in acc.Images("heldout/queries")] == ends
    assert "eval/precision_at_1" not in acc.Tags()["scalars"]


def test_training_writes_hparams_and_config_text(train_py_run: Path) -> None:
    acc = events(train_py_run)
    config = text(acc, "config")
    assert f"max_steps: {MAX_STEPS}" in config and "TripletMarginLoss" in config
    hp = hparams(acc)
    values = hp["_hparams_/session_start_info"].session_start_info.hparams
    assert values["train.max_steps"].number_value == MAX_STEPS
    assert values["model.backbone"].string_value == "tf_efficientnet_lite0"
    assert values["train.optimizer.args.lr"].number_value == pytest.approx(1e-3)  # triplet.yaml
    metrics = {m.name.tag for m in hp["_hparams_/experiment"].experiment.metric_infos}
    assert {"best/precision_at_1", "heldout/precision_at_1", "train/loss_epoch"} <= metrics
    assert metrics <= set(acc.Tags()["scalars"])  # every metric the tab lists has values
    assert "_hparams_/session_end_info" in hp  # finished


def test_evaluated_checkpoint_lands_on_its_training_curve(train_py_run: Path, tmp_path) -> None:
    """evaluate.py on best.pt logs heldout/* at the checkpoint's global step, with the value
    the training loop logged there: both embed through the same (BatchNorm-folded) model."""
    best = train_py_run / "checkpoints" / "best.pt"
    step = load_checkpoint(best)["state"]["step"]
    out = tmp_path / "eval"
    out.mkdir()
    result = evaluate(embedder_from_checkpoint(best), out, "test")
    acc = events(out)
    (point,) = acc.Scalars("heldout/precision_at_1")
    assert point.step == step
    trained = events(train_py_run)
    shared = set(trained.Tags()["scalars"]) & set(acc.Tags()["scalars"])
    assert {"heldout/precision_at_1", "heldout/map_at_r", "heldout/roc_auc"} <= shared
    for tag in shared:
        at_step = {e.step: e.value for e in trained.Scalars(tag)}[step]
        assert acc.Scalars(tag)[0].value == pytest.approx(at_step, abs=1e-9), tag
    assert point.value == pytest.approx(result.metrics["precision_at_1"], abs=1e-6)
    assert steps(acc, "heldout/map_at_r") == [step]
    assert all(t.startswith("heldout/") for t in acc.Tags()["scalars"])
    assert "| num queries |" in text(acc, "eval/diagnostics")
    assert text(acc, "eval/report").startswith("# Evaluation report")
    assert "_hparams_/session_start_info" in hparams(acc)
    header = next(out.glob("*/heldout/metadata.tsv")).read_text().splitlines()[0]
    assert header.split("\t") == ["class", "top1_correct", "top1_class", "file", "worst_class"]


def test_resume_purges_the_lost_runs_events(tmp_path, monkeypatch) -> None:
    """Killed after epoch 2's events were written but before its checkpoint: the resumed run
    logs those steps again, and TensorBoard shows each step once."""
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    cfg = load_config(REPO / "configs/siamese.yaml", [
        *TINY_RUN, "train.epochs=2", "eval.batch_size=16", "train.figures_every=0",
        f"data.root={root}", f"output_dir={tmp_path / 'exp'}",
    ])
    real_save = trainer.Run.save

    def crash_in_epoch_2(run, name):
        if run.state.epoch == 2:
            raise KeyboardInterrupt
        return real_save(run, name)

    monkeypatch.setattr(trainer.Run, "save", crash_in_epoch_2)
    with pytest.raises(SystemExit):
        trainer.fit(cfg)
    run_dir = next((tmp_path / "exp").glob("*/*"))
    before = events(run_dir)
    assert steps(before, "train/loss") == [1, 2, 3, 4]  # epoch 2 was logged, not saved
    monkeypatch.setattr(trainer.Run, "save", real_save)
    trainer.fit(resume=run_dir)
    acc = events(run_dir)
    assert steps(acc, "train/loss") == [1, 2, 3, 4]
    assert steps(acc, "heldout/precision_at_1") == [0, 2, 4]  # the start is not repeated
    assert "heldout/roc_auc" not in acc.Tags()["scalars"]  # figures_every=0
    declared = hparams(acc)["_hparams_/experiment"].experiment.metric_infos
    assert {m.name.tag for m in declared} <= set(acc.Tags()["scalars"])


def test_training_loop_embeds_held_out_images_as_evaluate_does(train_py_run: Path, tmp_path):
    """The cause of "two numbers that disagree": under bf16 autocast, BatchNorm folded into
    the convolutions (evaluate.py) rounds differently from the unfolded training model, which
    flips near-tied neighbours. The training loop now embeds through the same folded model
    (and caches the held-out prefix through it): bit-identical embeddings."""
    best = train_py_run / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(best)
    embedder = embedder_from_checkpoint(best)
    run = trainer.Run(embedder.cfg, tmp_path / "run")
    run.restore(ckpt)
    emb, labels, indices = extract_embeddings(
        run.inference_model(), run.eval_batches, run.infer_spec, from_prefix=run.from_prefix
    )
    held = run.data.split.heldout
    want = embedder.embed(run.data.paths(held), run.data.folder.labels[held])
    assert np.array_equal(indices, np.arange(len(held)))
    assert np.array_equal(emb, want)
