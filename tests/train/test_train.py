"""End to end: every shipped mode trains a few steps on tiny images; resume is exact;
user mistakes give clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mltrain.config import load_config
from mltrain.errors import ConfigError, DataError, MltrainError
from mltrain.model.checkpoint import load_checkpoint
from mltrain.train import run as trainer
from mltrain.train.setup import SPLIT_NONE_NOTE
from tests.conftest import TINY_RUN, write_image_folder, write_shapes_gallery

CONFIGS = sorted(Path("configs").glob("*.yaml"))
# split_by class: the generated folders are flat (configs/handwriting.yaml splits by alphabet)
TINY = [*TINY_RUN, "train.epochs=2", "eval.batch_size=16", "data.split_by=class"]


pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def tiny_cfg(config: Path | str, root: Path, out: Path, *extra: str):
    return load_config(config, [*TINY, f"data.root={root}", f"output_dir={out}", *extra])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_trains_and_checkpoints(config, tmp_path):
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    run_dir = trainer.fit(tiny_cfg(config, root, tmp_path / "exp", "train.max_steps=3"))
    assert run_dir.parent.name == config.stem
    for name in (
        "config.yaml",
        "split.json",
        "metrics.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["steps"] == 3  # max_steps stops the run
    assert 0.0 <= summary["final"]["precision_at_1"] <= 1.0
    assert list(run_dir.glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["config"]["name"] == config.stem
    assert ckpt["config"]["data"]["root"] == str(root)


def test_training_lowers_loss(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    cfg = tiny_cfg(
        "configs/classification.yaml",
        root,
        tmp_path / "exp",
        "train.epochs=4",
        # a random trunk trained whole for 8 steps of 8 images is all noise; the last stage
        # and the head learn these colour classes within a few steps, for any seed
        "model.trainable_stages=null",
        "model.frozen_stages=7",
        "train.cache_frozen=false",
        "train.optimizer.args.lr=3e-3",
    )
    run_dir = trainer.fit(cfg)
    history = json.loads((run_dir / "metrics.json").read_text())["final"]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    summary = ckpt["state"]["history"]
    assert summary[-1]["loss"] < 0.8 * summary[0]["loss"]
    assert history["epoch"] == 4


def _interrupt_at(monkeypatch, epoch_to_stop: int):
    real = trainer.Run.train_epoch

    def fake(run, epoch):
        if epoch == epoch_to_stop:
            raise KeyboardInterrupt
        real(run, epoch)

    monkeypatch.setattr(trainer.Run, "train_epoch", fake)


def test_resuming_a_finished_run_says_so_and_rebuilds_nothing(tmp_path, capsys, monkeypatch):
    """It used to check the data and rebuild the model, silently, to train nothing. One killed
    before writing its summary is still rebuilt, to write it."""
    from mltrain.commands import train as train_command

    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    run_dir = trainer.fit(tiny_cfg("configs/triplet.yaml", root, tmp_path / "exp"))
    metrics = (run_dir / "metrics.json").read_text()
    capsys.readouterr()
    real_run = trainer.Run
    monkeypatch.setattr(trainer, "Run", lambda *a, **k: pytest.fail("the run was rebuilt"))
    train_command.main(["--resume", str(run_dir)])
    out, err = capsys.readouterr()
    assert err == (
        f"note: {run_dir} already finished (at epoch 2, step 2); nothing to train (to train "
        "longer, start a new run). Its summary:\n"
    )
    assert out.startswith("done: 2 epochs, 2 steps") and out.endswith(f"\n{run_dir}\n")
    assert (run_dir / "metrics.json").read_text() == metrics
    (run_dir / "metrics.json").unlink()
    monkeypatch.setattr(trainer, "Run", real_run)
    assert trainer.fit(resume=run_dir) == run_dir and (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize("config", ["configs/siamese.yaml", "configs/triplet.yaml"])
@pytest.mark.parametrize("cache", [True, False])
def test_resume_matches_uninterrupted_run(config, cache, tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    extra = ["train.epochs=3", f"train.cache_frozen={str(cache).lower()}"]
    full = trainer.fit(tiny_cfg(config, root, tmp_path / "a", *extra))

    _interrupt_at(monkeypatch, 1)
    with pytest.raises(SystemExit):
        trainer.fit(tiny_cfg(config, root, tmp_path / "b", *extra))
    interrupted = next((tmp_path / "b").glob("*/*"))
    assert load_checkpoint(interrupted)["state"]["epoch"] == 1
    monkeypatch.undo()
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    resumed = trainer.fit(resume=interrupted)

    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert a["state"]["step"] == b["state"]["step"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert (
        a["state"]["history"][-1]["precision_at_1"] == b["state"]["history"][-1]["precision_at_1"]
    )


def test_missing_data_root_is_a_clear_error(tmp_path):
    cfg = tiny_cfg("configs/siamese.yaml", tmp_path / "nowhere", tmp_path / "exp")
    with pytest.raises(DataError, match="nowhere"):
        trainer.fit(cfg)


def test_folder_without_images_is_a_note_not_a_class(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    (root / "empty_one").mkdir()
    (root / "empty_one" / "readme.txt").write_text("not an image")
    cfg = tiny_cfg("configs/siamese.yaml", root, tmp_path / "exp", "train.max_steps=1")
    run_dir = trainer.fit(cfg)
    assert "left out: empty_one (files: .txt)" in (run_dir / "notes.txt").read_text()
    split = json.loads((run_dir / "split.json").read_text())
    assert {c for _, c in split["train"]} == {"class_0", "class_1", "class_2"}


def test_split_none_says_its_held_out_figures_are_the_training_images(tmp_path, capsys):
    """Training with data.split=none prints "held-out precision_at_1 ..." with a note that the
    "held-out" images are the ones it trained on."""
    root = write_image_folder(tmp_path / "data", classes=3, per_class=4)
    run_dir = trainer.fit(tiny_cfg("configs/triplet.yaml", root, tmp_path / "exp",
                                   "data.split=none", "train.max_steps=1"))  # fmt: skip
    assert SPLIT_NONE_NOTE in (run_dir / "notes.txt").read_text()
    assert f"note: {SPLIT_NONE_NOTE}" in capsys.readouterr().err
    assert SPLIT_NONE_NOTE.startswith("data.split: none trains on every image, so its "
                                      "held-out figures (and the pick of best.pt)")


def test_class_with_one_image_under_pair_sampler(tmp_path):
    root = write_image_folder(
        tmp_path / "data", classes=["a", "b", "c", "lonely"], per_class=[8, 8, 8, 2]
    )
    # 2 images split half/half leave 1 training image in 'lonely': it sits out the balanced
    # batches (no positive to pair with), the run goes on, and it is still evaluated
    run_dir = trainer.fit(tiny_cfg("configs/triplet.yaml", root, tmp_path / "exp"))
    notes = (run_dir / "notes.txt").read_text()
    assert "1 class with a single training image sit out the balanced batches" in notes
    assert "lonely" in notes
    heldout = json.loads((run_dir / "split.json").read_text())["heldout"]
    assert any(label == "lonely" for _, label in heldout)
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_unreadable_image_stops_before_training_and_is_listed(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    (root / "class_1" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="broken.jpg") as info:
        trainer.fit(tiny_cfg("configs/siamese.yaml", root, tmp_path / "exp"))
    kept = next((tmp_path / "exp").rglob("bad_images.txt"))
    assert "broken.jpg" in kept.read_text()
    assert f"(listed in {kept})" in str(info.value).splitlines()[0]  # the kept folder is named


def test_unreadable_image_can_be_skipped(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=8)
    (root / "class_1" / "broken.jpg").write_bytes(b"")
    run_dir = trainer.fit(
        tiny_cfg(
            "configs/siamese.yaml",
            root,
            tmp_path / "exp",
            "data.bad_images=skip",
            "train.max_steps=1",
        )
    )
    split = json.loads((run_dir / "split.json").read_text())
    assert "broken.jpg" not in json.dumps(split)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.backbone=not_a_model_xyz", "not_a_model_xyz"),
        ("train.loss={name: NoSuchLoss}", "NoSuchLoss"),
        ("train.miner={name: NoSuchMiner}", "NoSuchMiner"),
        ("train.optimizer={name: nosuchopt, args: {lr: 0.1}}", "nosuchopt"),
    ],
)
def test_unknown_component_names_are_config_errors(override, needle, tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    with pytest.raises(ConfigError, match=needle):
        trainer.fit(tiny_cfg("configs/siamese.yaml", root, tmp_path / "exp", override))


def test_a_pretrained_typo_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    """`model.pretrained=ture` (read as a weights path) is refused before the 130 MB Caltech
    archive is extracted."""
    from mltrain.data import pipeline

    monkeypatch.setattr(pipeline, "read_images", lambda *a, **k: pytest.fail("data read first"))
    cfg = tiny_cfg("configs/siamese.yaml", tmp_path / "any", tmp_path / "exp",
                   "model.pretrained=ture")  # fmt: skip
    with pytest.raises(ConfigError) as info:
        trainer.fit(cfg)
    assert str(info.value) == ("model.pretrained: 'ture' is neither true/false/offline nor an "
                               "existing file (.safetensors, .pth, .bin); an hf-hub:ORG/NAME id "
                               "also works")  # fmt: skip
    assert not (tmp_path / "exp").exists()


def test_unwritable_output_dir_fails_before_training(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("x")
    with pytest.raises(MltrainError, match="cannot write"):
        trainer.fit(tiny_cfg("configs/siamese.yaml", root, blocker))


def test_duplicates_across_the_split_are_reported(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=8)
    images = sorted((root / "class_0").iterdir())
    for dst in images[1:]:  # every image of class_0 identical: some land on both sides
        dst.write_bytes(images[0].read_bytes())
    run_dir = trainer.fit(tiny_cfg("configs/siamese.yaml", root, tmp_path / "exp",
                                   "train.max_steps=1"))
    listed = (run_dir / "duplicates.txt").read_text()
    assert "class_0" in listed and "==" in listed
    assert "byte-identical" in capsys.readouterr().err


# --- optimizer groups and checkpoint selection ---------------------------------------------


def test_proxies_get_their_own_learning_rate_and_layers_decay(tmp_path):
    from mltrain.model.losses import build_criterion
    from mltrain.model.network import build_model

    cfg = load_config("configs/pooling.yaml", [
        "model.pretrained=false", "train.loss={name: ProxyAnchorLoss}", "train.miner=null",
        "train.optimizer.args.lr=1e-3", "train.loss_lr=0.1", "train.layer_decay=0.5",
        "train.scheduler.args.warmup_epochs=0",
    ])  # fmt: skip
    model = build_model(cfg.model)
    crit = build_criterion(cfg.train.loss, None, 7, model.embedding_dim, False)
    opt = trainer.make_optimizer(cfg, model, crit.loss)
    trainer.make_scheduler(cfg, opt, 10).step_update(0)
    proxies = opt.param_groups[-1]
    assert proxies["params"] == [crit.loss.proxies] and proxies["lr"] == pytest.approx(0.1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    head = model.trunk.conv_head.weight
    last_block = model.trunk.blocks[6][0].conv_pw.weight  # frozen_stages 7: stage 7 trains
    assert lr_of[id(head)] == pytest.approx(1e-3 * 0.5)  # one layer below the top
    assert lr_of[id(last_block)] <= lr_of[id(head)]
    assert id(model.trunk.conv_stem.weight) not in lr_of  # frozen: not optimised at all


def test_loss_lr_for_a_loss_without_parameters_is_refused():
    from mltrain.model.losses import build_criterion
    from mltrain.model.network import build_model

    cfg = load_config("configs/triplet.yaml", ["model.pretrained=false", "train.loss_lr=0.1"])
    model = build_model(cfg.model, num_classes=3)
    crit = build_criterion(cfg.train.loss, cfg.train.miner, 3, model.embedding_dim, False)
    with pytest.raises(ConfigError) as info:
        trainer.make_optimizer(cfg, model, crit.loss)
    assert str(info.value) == (
        "train.loss_lr: TripletMarginLoss has no parameters of its own (proxies, class "
        "centres), so loss_lr would change nothing; remove it"
    )
    # the early check builds the optimizer without the loss: a proxy config must pass it
    trainer.check_optimization(load_config("configs/pooling.yaml", ["model.pretrained=false"]))


def test_the_early_optimizer_check_leaves_layer_decay_to_the_model(caplog):
    """It builds the optimizer for one parameter, which has no layers: timm warned "Layer-wise
    lr decay has no effect" at every start, though the real optimizer decays 23 layers."""
    from mltrain.model.network import build_model

    sets = ["model.pretrained=false", "model.trainable_stages=null", "train.cache_frozen=false",
            "train.cache_views=1", "train.layer_decay=0.8"]  # fmt: skip
    cfg = load_config("configs/classification.yaml", sets)
    with caplog.at_level("WARNING"):
        trainer.check_optimization(cfg)
    assert "Layer-wise lr decay" not in caplog.text
    model = build_model(replace(cfg.model, backbone="tf_efficientnet_lite2"), num_classes=3)
    scales = {round(g["lr_scale"], 6) for g in trainer.make_optimizer(cfg, model).param_groups}
    assert len(scales) == 23 and max(scales) == 1.0 and min(scales) == round(0.8**22, 6)


def test_best_metric_is_checked_and_eer_picks_the_lowest(tmp_path):
    with pytest.raises(ConfigError, match="train.best_metric: 'precision@1' is not a held-out"):
        load_config("configs/siamese.yaml", ["train.best_metric=precision@1"])
    assert load_config("configs/siamese.yaml").train.best_metric == "roc_auc"
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    cfg = tiny_cfg("configs/siamese.yaml", root, tmp_path / "exp",
                   "train.best_metric=eer", "train.epochs=3")  # fmt: skip
    run_dir = trainer.fit(cfg)
    summary = json.loads((run_dir / "metrics.json").read_text())
    eers = [summary["start"]["eer"], *(h["eer"] for h in trainer_history(run_dir))]
    assert summary["best_metric"] == "eer" and summary["best"]["eer"] == min(eers)


def trainer_history(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return ckpt["state"]["history"]


def test_bnneck_hybrid_trains_and_embeds_through_the_neck(tmp_path):
    from mltrain.inference.embedder import embedder_from_checkpoint

    with pytest.raises(ConfigError, match="model.bnneck: the hybrid trains a metric loss"):
        load_config("configs/triplet.yaml", ["model.head=false"])  # bnneck without a head
    root = write_image_folder(tmp_path / "data", classes=4, per_class=8)
    cfg = tiny_cfg("configs/triplet.yaml", root, tmp_path / "exp", "model.head=true",
                   "model.bnneck=true", "train.epochs=2")  # fmt: skip
    run_dir = trainer.fit(cfg)
    model = embedder_from_checkpoint(run_dir / "checkpoints" / "best.pt").model
    assert model.head.bias is None and not model.bnneck.bias.requires_grad
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.bnneck(model(x)), dim=1)
        assert torch.allclose(model.embed(x), expected, atol=1e-6)
    assert int(model.bnneck.num_batches_tracked) > 0  # the neck's statistics were trained


def test_start_note_when_training_never_beats_the_untrained_model():
    from mltrain.train.checkpoints import start_note

    start = {"map_at_r": 0.65, "eer": 0.04}
    note = start_note("map_at_r", {"map_at_r": 0.60}, start)
    assert "held-out map_at_r 0.6000 (best epoch) never beat the untrained model's 0.6500" in note
    assert start_note("map_at_r", {"map_at_r": 0.65}, start) is not None  # a tie is no gain
    assert start_note("map_at_r", {"map_at_r": 0.70}, start) is None
    assert start_note("eer", {"eer": 0.05}, start) is not None  # lower is better
    assert start_note("eer", {"eer": 0.03}, start) is None
    assert start_note("map_at_r", {"map_at_r": 0.60}, {}) is None  # train.eval_start off
    assert "at the held-out ones' expense" in note  # unseen classes (the default)
    own = start_note("map_at_r", {"map_at_r": 0.60}, start, "per_class")
    assert "did not help on held-out images of its own classes" in own and "expense" not in own
    perfect = start_note("map_at_r", {"map_at_r": 1.0}, {"map_at_r": 1.0}, "per_class")
    assert "was already 1.0000 before training: these held-out images are too few" in perfect
    assert "too few" in start_note("eer", {"eer": 0.0}, {"eer": 0.0})
    val = start_note("eer", {"eer": 0.05}, start, "class_disjoint", "validation")
    assert val.startswith("validation eer 0.0500 (best epoch) never beat")  # the side it scored


def test_bn_stats_auto_keeps_the_better_statistics(tmp_path):
    """Running statistics never touch a training step (it normalises by the batch), so the
    three settings train alike; at the first evaluation `auto` scores the better of what
    `update` and `pretrained` score, and `pretrained` ends with its statistics untouched."""
    root = write_shapes_gallery(tmp_path / "data", per_class=8, size=32)  # not separable at once
    history, last = {}, {}
    for mode in ("update", "pretrained", "auto"):
        cfg = tiny_cfg("configs/triplet.yaml", root, tmp_path / mode, f"model.bn_stats={mode}")
        ckpt = load_checkpoint(trainer.fit(cfg) / "checkpoints" / "last.pt")
        history[mode], last[mode] = ckpt["state"]["history"], ckpt["model"]
    losses = {mode: [h["loss"] for h in rows] for mode, rows in history.items()}
    assert losses["update"] == losses["pretrained"] == losses["auto"]
    first = {mode: rows[0] for mode, rows in history.items()}
    assert first["auto"]["map_at_r"] == pytest.approx(
        max(first["update"]["map_at_r"], first["pretrained"]["map_at_r"])
    )
    assert first["auto"]["pretrained_bn_stats"] == float(
        first["pretrained"]["map_at_r"] > first["update"]["map_at_r"]
    )
    assert first["update"]["map_at_r"] != first["pretrained"]["map_at_r"]  # a real choice
    assert "pretrained_bn_stats" not in first["update"]
    key = "trunk.blocks.6.0.bn1.running_var"  # a stage that trains in the shipped triplet config
    fresh = torch.ones_like(last["pretrained"][key])  # untrained weights: BatchNorm's initial 1
    assert torch.equal(last["pretrained"][key], fresh)
    assert not torch.equal(last["update"][key], fresh)
