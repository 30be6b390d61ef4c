"""Atomic checkpoint writes and safe loads."""

from __future__ import annotations

import os
import pickle
import shlex
import stat
from pathlib import Path

import pytest
import torch

from mltrain.errors import CheckpointError, ConfigError
from mltrain.files import atomic_save
from mltrain.model import checkpoint
from mltrain.model.checkpoint import load_checkpoint, resolve_checkpoint


def sample(epoch: int = 3) -> dict:
    torch.manual_seed(epoch)
    lin = torch.nn.Linear(3, 2)
    return {
        "model": lin.state_dict(),
        "config": {"name": "run", "train": {"lr": 1e-3, "ks": [1, 5]}, "head": False},
        "epoch": epoch,
        "best": None,
        "pair": (1, "a"),
        "rng": torch.get_rng_state(),
        "format_version": checkpoint.CHECKPOINT_FORMAT,
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


# --- atomic save and round trip ---------------------------------------------------------------


def test_atomic_save_round_trip_and_no_temp_file(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"  # parent folders are created
    obj = sample()
    atomic_save(obj, path)
    assert path.is_file()
    assert leftovers(path.parent) == []
    assert os.listdir(path.parent) == ["last.pt"]
    assert_same(load_checkpoint(path), obj)


def test_atomic_save_overwrites(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save(sample(1), path)
    atomic_save(sample(2), path)
    assert load_checkpoint(path)["epoch"] == 2
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_during_save_keeps_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "last.pt"
    atomic_save(sample(1), path)
    before = path.read_bytes()
    written = []

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # part of a file, then the process "dies"
        written.append(getattr(f, "name", None))
        raise exc

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(type(exc)):
        atomic_save(sample(2), path)
    monkeypatch.undo()

    assert written, "the fake torch.save was not called"
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["last.pt"]


# --- refused loads ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01this is not a checkpoint\xff" * 10)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "not a loadable" in str(info.value)


def test_truncated_file(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save(sample(), good)
    data = good.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "obj",
    [{"model": {}}, {"config": {}}, {"state_dict": {}}, [1, 2, 3], torch.zeros(2)],
    ids=["no-config", "no-model", "other-dict", "list", "tensor"],
)
def test_not_an_mltrain_checkpoint(tmp_path, obj):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "no model/config" in str(info.value)


class Evil:
    """Unpickling this runs a shell command (it creates the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_payload_is_really_dangerous(tmp_path):
    """Guard for the next test: an unsafe unpickle of Evil does create its marker."""
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_arbitrary_pickle_is_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(1)}, "config": {"evil": Evil(marker)}}
    if writer == "torch_zip":
        torch.save(payload, path, _use_new_zipfile_serialization=True)
    elif writer == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


# --- resolving run folders --------------------------------------------------------------------


def test_resolve_run_folder(tmp_path):
    run = tmp_path / "experiments" / "triplet"
    last = run / "checkpoints" / "last.pt"
    atomic_save(sample(5), last)
    atomic_save(sample(4), run / "checkpoints" / "best.pt")
    assert resolve_checkpoint(run) == last
    assert resolve_checkpoint(run / "checkpoints") == last
    assert load_checkpoint(run)["epoch"] == 5
    assert load_checkpoint(run / "checkpoints")["epoch"] == 5
    assert resolve_checkpoint(run, prefer="best.pt") == run / "checkpoints" / "best.pt"
    assert load_checkpoint(run, prefer="best.pt")["epoch"] == 4  # what evaluate/export take
    (run / "checkpoints" / "best.pt").unlink()
    assert resolve_checkpoint(run, prefer="best.pt") == last  # a run with no best.pt yet


def test_the_run_folder_of_a_loose_checkpoint_is_the_folder_holding_it(tmp_path):
    """Results of `evaluate --checkpoint ~/Downloads/model.pt` belong beside it: they used to
    land one folder up (in ~), as if every checkpoint sat in a run's checkpoints/."""
    run = tmp_path / "experiments" / "triplet"
    atomic_save(sample(5), run / "checkpoints" / "last.pt")
    (run / "config.yaml").write_text("name: triplet\n")  # every run writes one
    atomic_save(sample(5), tmp_path / "downloads" / "model.pt")
    atomic_save(sample(5), tmp_path / "home" / "checkpoints" / "model.pt")  # no run above
    assert checkpoint.run_folder(run / "checkpoints" / "last.pt") == run.resolve()
    assert checkpoint.run_folder(run) == run
    assert checkpoint.run_folder(run / "checkpoints") == run  # not <run>/checkpoints/eval/
    for loose in (tmp_path / "downloads", tmp_path / "home" / "checkpoints"):
        assert checkpoint.run_folder(loose / "model.pt") == loose.resolve()
    home_checkpoints = tmp_path / "home" / "checkpoints"
    assert checkpoint.run_folder(home_checkpoints) == home_checkpoints


def test_resolve_folder_without_checkpoint(tmp_path):
    run = tmp_path / "empty_run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(run)
    assert str(run) in str(info.value) and "last.pt" in str(info.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(run)


def test_a_name_folder_of_runs_names_the_latest_run(tmp_path):
    name = tmp_path / "experiments" / "triplet"
    for stamp in ("20261128-101500", "20261128-165802"):
        atomic_save(sample(1), name / stamp / "checkpoints" / "best.pt")
        atomic_save(sample(1), name / stamp / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(name, prefer="best.pt")
    assert str(info.value) == (
        f"{name} holds 2 run folder(s), not a checkpoint; pass one, "
        f"e.g. {name / '20261128-165802'} (the latest)"
    )


def test_written_files_and_staged_folders_get_the_umask_modes_not_private_ones(tmp_path):
    from mltrain.files import staging_dir, umask

    old = os.umask(0o027)
    try:
        assert umask() == 0o027  # read without changing it
        atomic_save(sample(1), tmp_path / "a.pt")
        staged = staging_dir(tmp_path / "bundle", "export")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o640  # not mkstemp's 0600
    assert stat.S_IMODE(staged.stat().st_mode) == 0o750  # not mkdtemp's 0700


def test_a_checkpoint_from_another_machine_embeds_with_this_machines_settings(tmp_path):
    """A run trained on a GPU machine (train.device cuda, 7 loader workers) is evaluated on a
    CPU machine: its machine settings start from this machine's defaults, `--set` still wins.
    Resuming keeps them (the same machine, usually)."""
    from mltrain.config import load_config, to_dict
    from mltrain.inference.embedder import embedder_from_checkpoint
    from mltrain.model.network import build_model
    from tests.conftest import TINY_RUN

    cfg = load_config(None, [*TINY_RUN, "train.device=cuda", "data.num_workers=7"])
    model = build_model(cfg.model, num_classes=2)
    ckpt = {"model": model.state_dict(), "config": to_dict(cfg), "train_classes": ["a", "b"]}
    path = tmp_path / "gpu.pt"
    atomic_save(ckpt, path)
    embedder = embedder_from_checkpoint(path)
    assert embedder.cfg.train.device == "auto" and embedder.cfg.data.num_workers is None
    assert embedder.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert embedder_from_checkpoint(path, ["data.num_workers=1"]).cfg.data.num_workers == 1
    kept = checkpoint.checkpoint_config(load_checkpoint(path), None, "resume")
    assert (kept.train.device, kept.data.num_workers) == ("cuda", 7)
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match=r"no CUDA device is available; use --set "
                                            r"train.device=auto \(or cpu\)"):  # fmt: skip
            embedder_from_checkpoint(path, ["train.device=cuda"])
    # A typo in --set is the user's: the message says so, not only "config stored in ..."
    with pytest.raises(ConfigError) as info:
        embedder_from_checkpoint(path, ["eval.tnse=false"])
    assert str(info.value).startswith(
        f"config stored in checkpoint {path} with --set eval.tnse=false: unknown key 'eval.tnse'"
    )


def test_a_config_or_a_bundle_given_as_checkpoint_is_named_for_what_it_is(tmp_path):
    """A new user's two likely mix-ups: the run's config.yaml ("unsafe" and "Unsupported
    operand 110" said nothing useful) and an exported search bundle."""
    config = tmp_path / "config.yaml"
    config.write_text("name: run\nseed: 0\ndata:\n  root: /data/\u00e9t\u00e9\n")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(config)
    assert str(info.value) == (
        f"{config} is a text file, not a checkpoint; pass a .pt file (a run's "
        "checkpoints/best.pt) or its run folder"
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bundle, prefer="best.pt")
    assert str(info.value) == (
        f"{bundle} is a search bundle, not a training run; search it with `mltrain search "
        f"{bundle} IMAGE`, or pass a run folder or .pt file"
    )
    cut = tmp_path / "cut.txt"  # a multi-byte character split by the 512-byte read
    cut.write_bytes(b"a" * 511 + "\u00e9".encode())
    assert checkpoint._reads_as_text(cut)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfname: run\n")
    assert checkpoint._reads_as_text(bom)
    legacy = tmp_path / "legacy.pt"  # torch's own legacy format at protocol 0: not "text"
    torch.save(sample(), legacy, _use_new_zipfile_serialization=False, pickle_protocol=0)
    assert not checkpoint._reads_as_text(legacy)
    zipped = tmp_path / "zipped.pt"
    torch.save(sample(), zipped)
    assert not checkpoint._reads_as_text(zipped) and load_checkpoint(zipped)["epoch"] == 3
