"""Hostile input: tampered bundles, odd files (FIFOs, devices, folders) and user mistakes.

Every case must end in one clear line (no traceback), read nothing outside a bundle and
never hang. Bundles use timm's tiny `test_efficientnet` with random weights on 32 px images.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import struct
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import mltrain.data.images as images_mod
import mltrain.files as files_mod
import mltrain.model.network as network_mod
import mltrain.retrieval.bundle as bundle_mod
from mltrain.commands.search import script as search_main
from mltrain.config import Config, load_config, to_dict
from mltrain.data.images import load_image
from mltrain.errors import BundleError, CheckpointError, ConfigError, DataError, MltrainError
from mltrain.files import atomic_save, sha256_file
from mltrain.inference import embedder as inference
from mltrain.model.checkpoint import load_checkpoint
from mltrain.model.network import build_model, create_backbone
from mltrain.retrieval.add import add_images
from mltrain.retrieval.bundle import load_bundle, safe_image_path
from mltrain.retrieval.bundle_model import bundle_embedder
from mltrain.retrieval.bundle_write import check_export_target
from mltrain.retrieval.export import export_bundle
from mltrain.retrieval.index import load_index
from mltrain.text import error_line, os_error_message, printable
from mltrain.train import run as trainer
from tests.conftest import TINY_RUN, tiny_embedder, write_image_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ESC = "\x1b[31mred\x1b]0;owned\x07"  # colour and window-title escape codes


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(image root, bundle) exported once; tests change copies (`bundle`)."""
    base = tmp_path_factory.mktemp("hostile")
    root = write_image_folder(base / "data", classes=3, per_class=4, size=(32, 32))
    return root, export_bundle(tiny_embedder(root, k=3), base / "b", "hostile tests")


@pytest.fixture
def bundle(exported, tmp_path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(exported[1], copy, symlinks=True)
    return copy


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every bundle holding an image nobody may read through one."""
    folder = write_image_folder(tmp_path / "outside", classes=["secret"], per_class=1)
    return folder


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file (links as their target text) under `folder`: proves nothing changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def rewrite_metadata(b: Path, edit) -> None:
    """Edit metadata.csv rows and re-sign it, as a tamperer would."""
    with open(b / "metadata.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows = [rows[0], *edit(rows[1:])]
    with open(b / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    edit_manifest(b, lambda m: m["files"].__setitem__("metadata.csv",
                                                       sha256_file(b / "metadata.csv")))


def edit_manifest(b: Path, edit) -> None:
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))


def resign(b: Path, name: str) -> None:
    edit_manifest(b, lambda m: m["files"].__setitem__(name, sha256_file(b / name)))


def one_error_line(err: str) -> str:
    """The command printed exactly one line, an error, and no traceback (progress bars,
    which redraw themselves with carriage returns, aside)."""
    lines = [x.split("\r")[-1].strip() for x in err.splitlines()]
    lines = [x for x in lines if x and "it/s]" not in x and "s/it]" not in x]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path that image decoding opens (a spy on the one place images are opened)."""
    seen: list[str] = []
    real = images_mod._open_regular

    def spy(path):
        seen.append(str(Path(path).resolve()))
        return real(path)

    monkeypatch.setattr(images_mod, "_open_regular", spy)
    return seen


@pytest.fixture
def deadline():
    """Fail instead of hanging: SIGALRM after 60 s."""

    def boom(signum, frame):
        raise TimeoutError("hung: no answer within 60 s")

    previous = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- tampered bundles: reading outside ------------------------------------------------------


def _symlink_images_out(b: Path, outside: Path) -> str:
    """images -> outside, and a row naming the secret through it; returns that row's path."""
    (b / "images").symlink_to(outside)
    row = "bundle:images/secret/img_000.jpg"
    rewrite_metadata(b, lambda rows: [[row, *rows[0][1:]], *rows[1:]])
    return row


def test_symlinked_images_folder_is_refused_on_load(bundle, outside):
    _symlink_images_out(bundle, outside)
    with pytest.raises(BundleError, match="images is a symlink"):
        load_bundle(bundle)


def test_search_sheet_on_symlinked_images_exits_2_and_reads_nothing_outside(
    bundle, outside, exported, tmp_path, capsys, opened
):
    _symlink_images_out(bundle, outside)
    sheet = tmp_path / "s.png"
    query = exported[0] / "class_0" / "img_000.jpg"
    assert search_main([str(bundle), str(query), "--sheet", str(sheet)]) == 2
    assert "symlink" in one_error_line(capsys.readouterr().err)
    assert not sheet.exists()
    assert not [p for p in opened if p.startswith(str(outside.resolve()))]


def test_images_symlinked_to_filesystem_root_is_refused(bundle):
    (bundle / "images").symlink_to("/")
    rewrite_metadata(bundle, lambda rows: [["bundle:images/etc/hostname", *rows[0][1:]],
                                           *rows[1:]])  # fmt: skip
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(bundle)


def test_symlink_inside_images_pointing_out_is_never_read(bundle, outside, exported, tmp_path,
                                                          capsys, opened):  # fmt: skip
    (bundle / "images" / "x").mkdir(parents=True)
    (bundle / "images" / "x" / "a.jpg").symlink_to(outside / "secret" / "img_000.jpg")
    rewrite_metadata(bundle, lambda rows: [["bundle:images/x/a.jpg", *rows[0][1:]], *rows[1:]])
    b = load_bundle(bundle)
    with pytest.raises(BundleError, match="outside"):
        safe_image_path(b, "bundle:images/x/a.jpg")
    sheet = tmp_path / "s.png"
    query = exported[0] / "class_0" / "img_000.jpg"  # its own row 0 is the tampered one
    assert search_main([str(bundle), str(query), "-k", "3", "--sheet", str(sheet)]) == 2
    assert "outside" in one_error_line(capsys.readouterr().err)
    assert not sheet.exists()
    assert not [p for p in opened if p.startswith(str(outside.resolve()))]


def test_add_never_copies_what_a_symlinked_images_points_at(bundle, outside, tmp_path, capsys):
    (bundle / "images").symlink_to(outside)
    before = fingerprint(bundle)
    new = write_image_folder(tmp_path / "new", classes=["zebra"], per_class=1)
    assert search_main(["--add", str(bundle), str(new)]) == 2
    assert "symlink" in one_error_line(capsys.readouterr().err)
    assert (bundle / "images").is_symlink() and fingerprint(bundle) == before
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".b.")]


@pytest.mark.parametrize("root", ["/", "/etc", "~"])
def test_image_root_that_is_not_a_data_folder_is_refused(bundle, root):
    root = str(Path(root).expanduser())
    edit_manifest(bundle, lambda m: m.__setitem__("image_root", root))
    with pytest.raises(BundleError, match="not a data folder"):
        load_bundle(bundle)


def test_image_root_override_is_checked_too(bundle, exported):
    with pytest.raises(BundleError, match="--image-root"):
        load_bundle(bundle, image_root="/")
    assert load_bundle(bundle, image_root=exported[0]).root == exported[0]


def test_root_paths_must_name_images(bundle, exported, tmp_path):
    """A row naming a file that is no image is never read, whatever its name says; a row
    naming an image without an image extension is read (face sets ship such files)."""
    root = shutil.copytree(exported[0], tmp_path / "data")
    (root / "notes").write_text("not an image")
    rewrite_metadata(bundle, lambda rows: [["notes", *rows[0][1:]], *rows[1:]])
    loaded = load_bundle(bundle, image_root=root)
    with pytest.raises(BundleError, match="not an image file"):
        safe_image_path(loaded, "notes")
    first = sorted(p for p in root.rglob("*") if p.suffix == ".png")[0]
    shutil.copy(first, first.with_name("copy.glasses"))
    rel = first.with_name("copy.glasses").relative_to(root).as_posix()
    assert safe_image_path(loaded, rel) == first.with_name("copy.glasses")


@pytest.mark.parametrize("name", ["model.pt", "index.faiss", "metadata.csv", "embeddings.npy"])
def test_bundle_file_symlinked_out_is_refused_before_reading(bundle, outside, name, monkeypatch):
    hashed = []
    real = files_mod.sha256_file
    monkeypatch.setattr(files_mod, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    secret = outside / "copy"
    secret.write_bytes((bundle / name).read_bytes())
    (bundle / name).unlink()
    (bundle / name).symlink_to(secret)  # same bytes: only the containment check can refuse
    with pytest.raises(BundleError, match="outside"):
        load_bundle(bundle)
    assert not [p for p in hashed if Path(p).name == name]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_bundle_file_that_is_a_fifo_or_device_fails_fast(bundle, kind, deadline):
    target = bundle / "model.pt"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")  # outside, and endless
    with pytest.raises(BundleError, match="not a regular file|outside"):
        load_bundle(bundle)


def test_fifo_manifest_fails_fast(bundle, deadline):
    (bundle / "manifest.json").unlink()
    os.mkfifo(bundle / "manifest.json")
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(bundle)


# --- tampered bundles: class names, index, model --------------------------------------------


def _escape_class(b: Path) -> None:
    edit_manifest(b, lambda m: m["classes"].__setitem__(0, ESC))
    rewrite_metadata(b, lambda rows: [[r[0], r[1], ESC if r[1] == "0" else r[2], r[3]]
                                      for r in rows])  # fmt: skip


def test_escape_codes_in_class_names_are_printed_escaped(bundle, exported, capsys):
    _escape_class(bundle)
    query = exported[0] / "class_0" / "img_000.jpg"
    assert search_main([str(bundle), str(query), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert printable(ESC) in out and "\\x1b[31mred" in out


def test_escape_codes_stay_escaped_in_json(bundle, exported, capsys):
    _escape_class(bundle)
    query = exported[0] / "class_0" / "img_000.jpg"
    assert search_main([str(bundle), str(query), "-k", "3", "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert json.loads(out)["queries"][0]["results"][0]["class"] == ESC  # data kept exact


def test_error_lines_escape_control_characters():
    line = error_line(DataError(f"class folder {ESC} has no images\n  second line"))
    assert "\x1b" not in line and "\x07" not in line and "\\x1b" in line
    assert line.count("\n") == 1  # listings keep their line breaks
    assert printable("a\u202eb\nc") == "a\\u202eb\\x0ac"  # bidi override and newline


def test_metadata_class_that_disagrees_with_the_manifest_is_refused(bundle):
    rewrite_metadata(bundle, lambda rows: [[*rows[0][:2], "impostor", rows[0][3]], *rows[1:]])
    with pytest.raises(BundleError, match="impostor"):
        load_bundle(bundle)


def test_class_names_that_are_not_strings_are_refused(bundle):
    edit_manifest(bundle, lambda m: m["classes"].__setitem__(0, {"not": "a name"}))
    with pytest.raises(BundleError, match="malformed.*classes"):
        load_bundle(bundle)


def _flat_bytes() -> bytes:
    idx = faiss.IndexFlatIP(8)
    idx.add(np.random.default_rng(0).random((5, 8), dtype=np.float32))
    return faiss.serialize_index(idx).tobytes()


def test_crafted_vector_size_is_refused_without_allocating_it(tmp_path):
    raw = _flat_bytes()
    at = raw.find(struct.pack("<Q", 40))  # the codes vector: 5 x 8 floats
    crafted = raw[:at] + struct.pack("<Q", 1 << 24) + raw[at + 8 :]  # 64 MiB claimed, 200 B file
    path = tmp_path / "index.faiss"
    path.write_bytes(crafted)
    limit = faiss.get_deserialization_vector_byte_limit()
    with pytest.raises(BundleError, match="crafted") as info:
        load_index(path)
    assert "deserialization_vector_byte_limit" in str(info.value)  # refused before allocating
    assert faiss.get_deserialization_vector_byte_limit() == limit  # and the limit restored


@pytest.mark.parametrize("header", [b"IxZZ", b"\xff\xff\xff\xff"])
def test_unknown_index_header_is_a_bundle_error(tmp_path, header):
    path = tmp_path / "index.faiss"
    path.write_bytes(header + _flat_bytes()[4:])
    with pytest.raises(BundleError, match="corrupt"):
        load_index(path)


def test_memory_error_while_reading_an_index_is_a_bundle_error(tmp_path, monkeypatch):
    path = tmp_path / "index.faiss"
    path.write_bytes(_flat_bytes())

    def bad_alloc(*args):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(faiss, "read_index", bad_alloc)
    with pytest.raises(BundleError, match="bad_alloc"):
        load_index(path)


def test_crafted_index_in_a_bundle_exits_2_with_one_line(bundle, exported, capsys):
    raw = (bundle / "index.faiss").read_bytes()
    (bundle / "index.faiss").write_bytes(raw[:4] + b"\xff" * 64 + raw[68:])
    resign(bundle, "index.faiss")
    query = exported[0] / "class_0" / "img_000.jpg"
    assert search_main([str(bundle), str(query)]) == 2
    assert "index.faiss" in one_error_line(capsys.readouterr().err)


def refuse_real_builds(monkeypatch) -> None:
    """The one model loader (`model_from_state`) may build on the meta device to compare keys
    and shapes; a real build before that check refuses the weights fails the test."""
    real = network_mod.build_model

    def no_build(*args, **kwargs):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("the model was built before its weights were checked")
        return real(*args, **kwargs)

    monkeypatch.setattr(network_mod, "build_model", no_build)


def test_manifest_naming_a_huge_backbone_is_refused_before_building_it(bundle, monkeypatch):
    def config(m):
        m["config"]["model"]["backbone"] = "vit_giant_patch14_224"
        m["config"]["model"]["image_size"] = 224  # whole patches: the weights are compared

    edit_manifest(bundle, config)

    refuse_real_builds(monkeypatch)
    with pytest.raises(BundleError, match="do not fit.*vit_giant"):
        bundle_embedder(load_bundle(bundle))


def test_manifest_config_that_does_not_build_names_the_bundle(bundle, monkeypatch):
    """A stored config this version refuses (32 px is no whole number of 14 px patches) is
    an error about the bundle, not a config key the user never wrote."""
    edit_manifest(bundle, lambda m: m["config"]["model"].__setitem__(
        "backbone", "vit_giant_patch14_224"))  # fmt: skip
    refuse_real_builds(monkeypatch)
    with pytest.raises(BundleError, match=r"does not build a model .*patch size 14"):
        bundle_embedder(load_bundle(bundle))


def test_checkpoint_naming_a_huge_backbone_is_refused_before_building_it(tmp_path, monkeypatch):
    small = build_model(tiny_embedder(tmp_path).cfg.model).state_dict()
    cfg = Config()
    cfg.model.backbone = "vit_giant_patch14_224"  # 1 billion parameters, 4 GB
    atomic_save({"model": small, "config": to_dict(cfg), "train_classes": []},
                tmp_path / "giant.pt")  # fmt: skip

    refuse_real_builds(monkeypatch)
    with pytest.raises(CheckpointError, match="do not fit"):
        inference.embedder_from_checkpoint(tmp_path / "giant.pt")


# --- odd files: FIFOs, devices, folders -----------------------------------------------------


def test_fifo_query_fails_fast_and_other_queries_run(exported, tmp_path, capsys, deadline):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    good = exported[0] / "class_1" / "img_001.png"
    assert search_main([str(exported[1]), str(fifo), str(good), "-k", "2"]) == 1
    captured = capsys.readouterr()
    assert "pipe.jpg" in one_error_line(captured.err) and "not a regular file" in captured.err
    assert f"query {good}" in captured.out


@pytest.mark.parametrize("path", ["/dev/zero", "folder"])
def test_devices_and_folders_are_not_images(tmp_path, path, deadline):
    target = Path(path) if path.startswith("/") else tmp_path
    with pytest.raises(DataError, match="not a regular file"):
        load_image(target)


def test_fifo_given_to_add_is_refused(exported, tmp_path, capsys, deadline):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(exported[1], copy)
    before = fingerprint(copy)
    os.mkfifo(tmp_path / "pipe.png")
    assert search_main(["--add", str(copy), str(tmp_path / "pipe.png")]) == 2
    assert "not a regular file" in one_error_line(capsys.readouterr().err)
    assert fingerprint(copy) == before


def test_fifo_config_and_checkpoint_fail_fast(tmp_path, deadline):
    os.mkfifo(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path / "c.yaml")
    os.mkfifo(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tmp_path / "c.pt")


def test_sheet_pointing_at_a_folder_fails_before_searching(exported, tmp_path, capsys,
                                                           monkeypatch):  # fmt: skip
    import mltrain.retrieval.search as search_mod  # what the command imports when it searches

    monkeypatch.setattr(search_mod, "search_images", lambda *a: pytest.fail("searched"))
    query = exported[0] / "class_0" / "img_000.jpg"
    assert search_main([str(exported[1]), str(query), "--sheet", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)


def test_added_file_without_an_image_name_is_refused(bundle, tmp_path):
    odd = tmp_path / "photo.txt"
    odd.write_bytes(b"not named as an image")
    with pytest.raises(DataError, match="not an image file name"):
        add_images(bundle, [odd])


# --- user mistakes: one line that says what to do -------------------------------------------


def test_quoted_weight_decay_fails_at_config_time():
    with pytest.raises(ConfigError, match=r"weight_decay: expected a number, got '1e-4'.*quotes"):
        load_config(None, ['train.optimizer.args.weight_decay="1e-4"'])
    with pytest.raises(ConfigError, match="betas: expected a list of numbers"):
        load_config(None, ["train.optimizer.args.betas=[0.9, fast]"])


def test_unknown_optimizer_arg_names_the_accepted_ones_not_every_optimizer():
    cfg = load_config(None, ["train.optimizer.args.warp_speed=9"])
    with pytest.raises(ConfigError) as info:
        trainer.check_optimization(cfg)
    message = str(info.value)
    assert "'warp_speed'" in message and "betas" in message and "eps" in message
    assert "lamb" not in message and "madgrad" not in message and len(message) < 400


def test_unknown_optimizer_name_suggests_close_ones():
    cfg = load_config(None, ["train.optimizer.name=adamx"])
    with pytest.raises(ConfigError, match="unknown optimizer 'adamx'; similar: .*adam") as info:
        trainer.check_optimization(cfg)
    assert len(str(info.value)) < 400


def test_similar_backbone_names_come_from_edit_distance():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet5O'; similar: resnet50"):
        create_backbone("resnet5O", False)


def test_config_folder_is_named_as_a_folder():
    with pytest.raises(ConfigError, match=r"configs is a folder; pass one YAML file.*siamese"):
        load_config(REPO / "configs")


def test_random_bytes_as_checkpoint_get_no_weights_only_false_advice(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"model": Payload(), "config": {}}, tmp_path / "evil.pt")
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(1).bytes(4096))
    messages = {}
    for name in ("evil.pt", "random.bin"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        messages[name] = str(info.value)
        assert name in messages[name]
        assert "weights_only" not in messages[name] and "likely succeed" not in messages[name]
    assert "nothing in it ran" in messages["evil.pt"]
    assert not (tmp_path / "ran").exists()


def test_os_errors_become_one_line_naming_the_file_and_what_to_do():
    import errno

    line = os_error_message(OSError(errno.ENOSPC, "No space left on device", "/x/sheet.png"))
    assert line.startswith("/x/sheet.png: No space left on device;") and "free space" in line
    assert "read-only" in os_error_message(OSError(errno.EROFS, "Read-only file system", "/x"))
    assert "give a file path" in os_error_message(IsADirectoryError(errno.EISDIR, "Is a dir", "d"))


# --- training: no stub folders, no races ----------------------------------------------------


def _tiny_train_cfg(root: Path, out: Path, *extra: str):
    return load_config(REPO / "configs/siamese.yaml",
                       [*TINY_RUN, f"data.root={root}", f"output_dir={out}", *extra])  # fmt: skip


@pytest.mark.parametrize("problem", ["one class", "unknown loss", "Ctrl-C in setup"])
def test_failed_training_leaves_no_stub_run_folder(tmp_path, monkeypatch, problem):
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=1 if problem == "one class" else 3,
                              per_class=6)  # fmt: skip
    extra = ["train.loss.name=NoSuchLoss"] if problem == "unknown loss" else []
    made = []
    real = trainer.new_run_dir
    monkeypatch.setattr(trainer, "new_run_dir", lambda cfg: made.append(real(cfg)) or made[-1])
    if problem == "Ctrl-C in setup":
        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(trainer, "build_model", interrupt)
    with pytest.raises((MltrainError, KeyboardInterrupt)):
        trainer.fit(_tiny_train_cfg(root, tmp_path / "exp", *extra))
    assert len(made) == 1 and not made[0].exists()  # it was created, then removed
    assert not made[0].parent.exists()  # and <output_dir>/<name>, empty now, too


@pytest.mark.parametrize("bad,match", [
    ("train.optimizer.args.warp_speed=9", "no argument 'warp_speed'"),
    ("model.backbone=resnet5O", "unknown timm model 'resnet5O'"),
    ("train.scheduler.name=sometimes", "sometimes"),
])  # fmt: skip
def test_bad_components_fail_before_any_run_folder_or_data_scan(tmp_path, monkeypatch, bad,
                                                                match):  # fmt: skip
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trainer, "prepare_data", lambda *a: pytest.fail("data scanned"))
    cfg = _tiny_train_cfg(tmp_path / "no-data", tmp_path / "exp", bad)
    with pytest.raises(ConfigError, match=match):
        trainer.fit(cfg)
    assert not (tmp_path / "exp").exists()


def test_run_folders_created_at_the_same_instant_are_distinct(tmp_path):
    cfg = Config()
    cfg.output_dir, cfg.name = str(tmp_path / "exp"), "race"
    start = threading.Barrier(8)
    made: list[Path] = []
    errors: list[Exception] = []

    def make():
        start.wait()
        try:
            made.append(trainer.new_run_dir(cfg))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(made)) == 8
    assert all((p / "checkpoints").is_dir() for p in made)


# --- non-finite and malformed bundle files ------------------------------------------------


def _nan_threshold(m: dict) -> None:
    m["verification"]["thresholds"][2]["threshold"] = float("nan")


@pytest.mark.parametrize("edit, key", [
    (_nan_threshold, "verification.thresholds[2].threshold is not a finite number"),
    (lambda m: m["verification"]["thresholds"][0].__setitem__("far", float("inf")),
     "verification.thresholds[0].far is not a finite number"),
    (lambda m: m["verification"]["thresholds"][1].__setitem__("threshold", "0.5"),
     "verification.thresholds[1].threshold is '0.5', not a number"),
    (lambda m: m["index"].setdefault("args", {}).__setitem__("nprobe", float("-inf")),
     "index.args.nprobe is not a finite number"),
    (lambda m: m["index"].setdefault("args", {}).__setitem__("ef_search", "many"),
     "index.args.ef_search is 'many', not a count of at least 1"),
])  # fmt: skip
def test_non_finite_or_non_numeric_manifest_values_are_refused_at_load(bundle, edit, key):
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert str(info.value).startswith(f"{bundle / 'manifest.json'}: {key}")


def test_nan_threshold_stops_verify_search_and_serve_with_one_line(bundle, exported, capsys,
                                                                   monkeypatch):  # fmt: skip
    from mltrain.__main__ import main

    edit_manifest(bundle, _nan_threshold)
    image = exported[0] / "class_0" / "img_000.jpg"
    with pytest.raises(SystemExit) as e:
        main(["verify", str(bundle), str(image), str(image), "--far", "1e-3"])
    assert e.value.code == 2
    assert "verification.thresholds[2].threshold" in one_error_line(capsys.readouterr().err)
    assert search_main([str(bundle), str(image), "--threshold", "auto"]) == 2
    assert "not a finite number" in one_error_line(capsys.readouterr().err)
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("it served"))
    with pytest.raises(SystemExit) as e:
        main(["serve", str(bundle), "--port", "0"])
    assert e.value.code == 2
    assert "verification.thresholds[2].threshold" in one_error_line(capsys.readouterr().err)


def test_nan_embeddings_with_a_matching_sha256_are_refused(bundle):
    emb = np.load(bundle / "embeddings.npy")
    emb[5, 3] = np.nan
    np.save(bundle / "embeddings.npy", emb)
    resign(bundle, "embeddings.npy")
    with pytest.raises(BundleError, match=r"embeddings.npy: row 5 holds NaN or infinite values"):
        load_bundle(bundle)


def test_non_finite_rows_are_found_chunk_by_chunk_in_shards(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_mod, "FINITE_CHUNK_ROWS", 2)  # several chunks per shard
    sharded = export_bundle(tiny_embedder(exported[0], k=3), tmp_path / "s", "shards",
                            shard_size=5)  # fmt: skip
    manifest = json.loads((sharded / "manifest.json").read_text())
    name = manifest["shards"][1]["name"]
    emb = np.load(sharded / name)
    emb[3] = np.inf  # row 5 + 3 of the gallery
    np.save(sharded / name, emb)
    edit_manifest(sharded, lambda m: m["shards"][1].__setitem__("sha256",
                                                                 sha256_file(sharded / name)))
    with pytest.raises(BundleError, match=rf"{name}: row 3 holds NaN or infinite values"):
        load_bundle(sharded)


def test_deeply_nested_manifest_is_one_line_in_search(bundle, exported, capsys, deadline):
    (bundle / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    image = exported[0] / "class_0" / "img_000.jpg"
    assert search_main([str(bundle), str(image)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "manifest.json nests 200,000 levels deep, more than the 64 allowed" in line
    check_export_target(bundle)  # the export's look at the old manifest: no crash


@pytest.mark.parametrize("content, says", [
    (b"\xff\xfe{}", "is not valid JSON (not UTF-8 text at byte 0)"),
    (b'{"a": ' * 70 + b"1" + b"}" * 70, "nests 70 levels deep"),
    (b"{" + b" " * 2048 + b"}", "holds 2,050 bytes, more than the 1,024 it may"),
])  # fmt: skip
def test_malformed_manifests_are_one_line_naming_the_file(bundle, monkeypatch, content, says):
    monkeypatch.setattr(bundle_mod, "MAX_MANIFEST_BYTES", 1024)
    (bundle / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert str(bundle / "manifest.json") in str(info.value) and says in str(info.value)


# --- clean-up: staging folders of killed writers ------------------------------------------


def test_an_add_with_nothing_to_add_still_clears_a_killed_adds_folders(bundle, exported):
    killed = bundle.parent / f".{bundle.name}.adding-k1ll3d"  # the old bundle after a SIGKILL
    import shutil

    shutil.copytree(bundle, killed)
    partial = bundle.parent / f".{bundle.name}.partial-x"
    partial.mkdir()
    before = fingerprint(bundle)
    assert add_images(bundle, [exported[0] / "class_0" / "img_000.jpg"]) == 0  # in it already
    assert not killed.exists() and not partial.exists()
    assert fingerprint(bundle) == before
    load_bundle(bundle)


def test_a_refused_export_still_clears_a_killed_exports_folder(exported, tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "mine.txt").write_text("not a bundle")
    stale = tmp_path / ".notes.partial-k1ll3d"
    stale.mkdir()
    with pytest.raises(BundleError, match="not a search bundle"):
        export_bundle(tiny_embedder(exported[0]), target, "refused")
    assert not stale.exists() and (target / "mine.txt").exists()


def test_an_error_line_stays_short_whatever_the_value_in_it():
    """A path of a million characters (a value pasted by mistake) makes one line of at most
    `MAX_LINE` characters, its end kept; the advice for a too-long name is said."""
    import errno

    from mltrain.text import MAX_LINE

    path = "/data/" + "x" * 1_000_000 + "/end.jpg"
    line = error_line(OSError(errno.ENAMETOOLONG, "File name too long", path))
    assert len(line) <= len("error: ") + MAX_LINE and "\n" not in line
    assert line.endswith("shorten it") and line.startswith("error: /data/xxx")
