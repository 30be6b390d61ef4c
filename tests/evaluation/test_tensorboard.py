"""TensorBoard events of training and evaluation, read back as TensorBoard reads them: one
x-axis (the global optimizer step), a few charts that each say something, curated hparams
with one metric list for all runs, and an evaluated checkpoint landing on its own training
curve with the same value. Also the training log as a file holds it: whole lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from mltrain.config import load_config
from mltrain.evaluation.evaluate import evaluate
from mltrain.evaluation.tensorboard import HPARAM_METRICS
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
def tb_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tb")


@pytest.fixture(scope="module")
def train_py_run(tb_tmp: Path) -> Path:
    """`python train.py ... --set train.max_steps=5 2> train.log`, as a user runs it."""
    tmp = tb_tmp
    root = write_image_folder(tmp / "data", classes=4, per_class=8)
    sets = [*TINY_RUN, "train.epochs=3", f"train.max_steps={MAX_STEPS}", "eval.batch_size=16",
            f"data.root={root}", f"output_dir={tmp / 'exp'}", *SMALL_EVAL]
    cmd = [sys.executable, "train.py", "--config", "configs/triplet.yaml"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "MLTRAIN_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("TQDM_DISABLE", None)
    log = tmp / "train.log"
    with log.open("w") as err:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err,
                              text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, log.read_text()[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_a_log_file_holds_whole_lines_not_progress_bars(train_py_run: Path, tb_tmp: Path):
    text = (tb_tmp / "train.log").read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == [
        "epoch 1", "epoch 2", "epoch 3"
    ]
    assert all(len(line) < 400 for line in lines)


def test_a_training_run_has_a_few_charts_train_first(train_py_run: Path) -> None:
    tags = sorted(events(train_py_run).Tags()["scalars"])
    assert tags == [
        "train/images_per_s", "train/loss", "train/lr", "val/eer", "val/map_at_r",
        "val/precision_at_1", "val/roc_auc", "val/tar_at_far_1e-3",
    ]  # fmt: skip
    assert len(tags) <= 10
    assert sorted({t.split("/")[0] for t in tags})[0] == "train"  # listed first


def test_train_loss_has_one_point_per_optimizer_step(train_py_run: Path) -> None:
    acc = events(train_py_run)
    assert steps(acc, "train/loss") == list(range(1, MAX_STEPS + 1))
    assert steps(acc, "train/lr") == list(range(1, MAX_STEPS + 1))
    assert all(e.value > 0 for e in acc.Scalars("train/lr"))


def test_epoch_tags_and_heldout_sit_at_global_steps(train_py_run: Path) -> None:
    acc = events(train_py_run)
    ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, MAX_STEPS]  # epochs 1, 2 and the cut-off 3
    for tag in ("train/images_per_s", "val/roc_auc", "val/eer"):
        assert steps(acc, tag) == ends, tag
    for tag in ("val/precision_at_1", "val/map_at_r"):  # and the untrained start
        assert steps(acc, tag) == [0, *ends], tag
    ckpt = load_checkpoint(train_py_run / "checkpoints" / "last.pt")
    history = ckpt["state"]["history"]
    assert [h["step"] for h in history] == ends
    logged = [e.value for e in acc.Scalars("val/precision_at_1")]
    assert logged[0] == pytest.approx(ckpt["start"]["precision_at_1"], abs=1e-6)
    assert logged[1:] == pytest.approx([h["precision_at_1"] for h in history], abs=1e-6)
    # the epoch means and the best-so-far figures are in the history and metrics.json
    assert all("loss" in h and "data_wait_share" in h for h in history)
    assert "precision_at_1" in json.loads((train_py_run / "metrics.json").read_text())["best"]
    assert [e.step for e in acc.Tensors("val/verification_pr")] == ends
    assert [e.step for e in acc.Images("val/queries")] == ends
    assert [e.step for e in acc.Images("val/roc")] == ends


def test_training_writes_hparams_and_config_text(train_py_run: Path) -> None:
    acc = events(train_py_run)
    config = text(acc, "config")
    assert f"max_steps: {MAX_STEPS}" in config and "TripletMarginLoss" in config
    hp = hparams(acc)
    values = hp["_hparams_/session_start_info"].session_start_info.hparams
    assert len(values) <= 20
    assert values["backbone"].string_value == "tf_efficientnet_lite0"
    assert values["loss"].string_value == "TripletMarginLoss"
    assert values["miner"].string_value == "TripletMarginMiner"
    assert values["lr"].number_value == pytest.approx(1e-3)  # triplet.yaml
    assert values["epochs"].number_value == 3
    assert values["m_per_class"].number_value == 2
    logged = yaml.safe_load(config.removeprefix("```yaml\n").removesuffix("```"))
    frozen, trainable = logged["model"]["frozen_stages"], logged["model"]["trainable_stages"]
    assert values["frozen_stages"].string_value == ("unset" if frozen is None else str(frozen))
    assert values["trainable_stages"].string_value == str(trainable)  # triplet.yaml sets it
    assert values["image_size"].string_value == "32"  # TINY_RUN; "auto" when left unset
    metrics = [m.name.tag for m in hp["_hparams_/experiment"].experiment.metric_infos]
    assert sorted(metrics) == sorted(HPARAM_METRICS)
    assert set(metrics) <= set(acc.Tags()["scalars"])  # every metric the tab lists has values
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
    (point,) = acc.Scalars("val/precision_at_1")
    assert point.step == step
    trained = events(train_py_run)
    shared = set(trained.Tags()["scalars"]) & set(acc.Tags()["scalars"])
    assert {"val/precision_at_1", "val/map_at_r", "val/roc_auc"} <= shared
    for tag in shared:
        at_step = {e.step: e.value for e in trained.Scalars(tag)}[step]
        assert acc.Scalars(tag)[0].value == pytest.approx(at_step, abs=1e-9), tag
    assert point.value == pytest.approx(result.metrics["precision_at_1"], abs=1e-6)
    assert steps(acc, "val/map_at_r") == [step]
    assert sorted(acc.Tags()["scalars"]) == sorted(HPARAM_METRICS)  # five charts, all held-out
    assert "| num queries |" in text(acc, "eval/diagnostics")
    assert text(acc, "eval/report").startswith("# Evaluation report")
    evaluated, training = hparams(acc), hparams(trained)
    assert [m.name.tag for m in evaluated["_hparams_/experiment"].experiment.metric_infos] == [
        m.name.tag for m in training["_hparams_/experiment"].experiment.metric_infos
    ]  # one metric list: the table keeps both runs' columns
    assert set(evaluated["_hparams_/session_start_info"].session_start_info.hparams) == set(
        training["_hparams_/session_start_info"].session_start_info.hparams
    )
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
    assert steps(acc, "val/precision_at_1") == [0, 2, 4]  # the start is not repeated
    declared = hparams(acc)["_hparams_/experiment"].experiment.metric_infos
    assert sorted(m.name.tag for m in declared) == sorted(HPARAM_METRICS)


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
