"""Tests for mltrain.data: folders and archives, splits, decoding, transforms, loaders, samplers."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mltrain.data import dataset as dataset_mod
from mltrain.data.dataset import ImageDataset, make_loader
from mltrain.data.images import check_images, load_image
from mltrain.data.readers import absolute_root, read_images, resolve_root
from mltrain.data.samplers import SAMPLERS, build_sampler, fit_batch_size
from mltrain.data.splits import disjoint_note, find_duplicates, load_split, make_split, save_split
from mltrain.data.transforms import DEFAULT_AUGMENT, eval_transform, train_transform
from mltrain.errors import ConfigError, DataError

CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.25, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


# ---------------------------------------------------------------- folders


def test_scan_orders_classes_and_files_and_labels(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes=["zebra", "a b", "été"], per_class=[2, 3, 2])
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / "zebra" / ".hidden.jpg").write_bytes(b"")
    (root / ".cache").mkdir()  # hidden folder: not a class
    shutil.copy(root / "zebra" / "img_000.jpg", root / "zebra" / "UPPER.JPG")
    folder = read_images(root)
    assert folder.classes == ["a b", "zebra", "été"]
    assert [p.relative_to(root).as_posix() for p in folder.paths] == [
        "a b/img_000.jpg", "a b/img_001.png", "a b/img_002.jpg",
        "zebra/UPPER.JPG", "zebra/img_000.jpg", "zebra/img_001.png",
        "été/img_000.jpg", "été/img_001.png",
    ]  # fmt: skip
    assert folder.labels.dtype == np.int64
    assert folder.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_scan_exclude(tiny_folder):
    folder = read_images(tiny_folder, exclude=["class_1"])
    assert folder.classes == ["class_0", "class_2"]
    assert len(folder) == 12 and set(folder.labels.tolist()) == {0, 1}
    assert read_images(tiny_folder, exclude="class_0").classes == ["class_1", "class_2"]


def test_scan_errors(tmp_path, make_image_folder):
    with pytest.raises(DataError, match="does not exist"):
        resolve_root(tmp_path / "nope")
    (tmp_path / "file.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"neither a \.tar\.gz/.* archive, a \.csv of labels nor"):
        resolve_root(tmp_path / "file.zip")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders"):
        read_images(tmp_path / "flat")
    root = make_image_folder(tmp_path / "d", classes=2, per_class=2)
    with pytest.raises(DataError, match="at least 2 class"):
        read_images(root, exclude=["class_0"])


def test_scan_notes_missing_exclusion_and_folders_without_images(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=2)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("x")
    folder = read_images(root, exclude=["BACKGROUND_Google", "clas_1"])
    assert folder.classes == ["class_0", "class_1", "class_2"]
    assert any("no class 'clas_1'" in n for n in folder.notes)  # a name the user wrote
    assert not any("BACKGROUND_Google" in n for n in folder.notes)  # the default: no noise
    assert any("empty" in n and ".txt" in n for n in folder.notes)
    assert read_images(root, exclude=["class_1"]).notes == [
        "folders with files but no images were left out: empty (files: .txt)"
    ]


def _tar(archive: Path, source: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


def test_archive_extracted_once_beside_it(tmp_path, tiny_folder, capsys, monkeypatch):
    archive = _tar(tmp_path / "cats.tar.gz", tiny_folder, "cats")
    root = resolve_root(archive)
    assert root == tmp_path / "cats"
    assert "extracting" in capsys.readouterr().err
    assert len(read_images(root)) == 18
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    mtime = root.stat().st_mtime_ns
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("extracted twice"))
    assert resolve_root(archive) == root and root.stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""


def test_archive_without_top_folder_and_unsafe_member(tmp_path, tiny_folder):
    flat = tmp_path / "flat.tgz"
    with tarfile.open(flat, "w:gz") as tar:
        for cls in ("class_0", "class_1"):
            tar.add(tiny_folder / cls, arcname=cls)
    assert read_images(resolve_root(flat)).classes == ["class_0", "class_1"]
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="cannot extract"):
        resolve_root(evil)
    assert not (tmp_path.parent / "escaped.txt").exists()
    assert not (tmp_path / "evil").exists()  # a failed extraction leaves nothing that looks done


def test_archive_in_read_only_dir_goes_to_cache(tmp_path, tiny_folder, monkeypatch):
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    archive = _tar(shelf / "cats.tar.gz", tiny_folder, "cats")
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    shelf.chmod(0o555)  # also honoured when tests run as root, who could write anyway
    try:
        root = resolve_root(archive)
        assert root.parent == tmp_path / "cache" and root.name.startswith("cats-")
        assert sorted(p.name for p in shelf.iterdir()) == ["cats.tar.gz"]
        assert resolve_root(archive) == root
    finally:
        shelf.chmod(stat.S_IRWXU)


def test_a_cached_extraction_survives_a_new_mtime_and_older_ones_are_named(
    tmp_path, tiny_folder, make_image_folder, monkeypatch, capsys
):
    """A re-mounted or re-downloaded archive (same path and size, new mtime) used to be
    extracted again under a new cache key, each copy kept; now it reuses its extraction, and
    an archive that really changed names the extractions it leaves behind."""
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    archive = _tar(shelf / "cats.tar.gz", tiny_folder, "cats")
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    shelf.chmod(0o555)
    try:
        root = resolve_root(archive)
        capsys.readouterr()
        os.utime(archive, ns=(1, 1))
        assert resolve_root(archive) == root and capsys.readouterr().err == ""
        shelf.chmod(stat.S_IRWXU)
        _tar(archive, make_image_folder(tmp_path / "more", classes=3, per_class=9), "cats")
        shelf.chmod(0o555)
        new = resolve_root(archive)
        assert new != root and len(read_images(new)) == 27 and len(read_images(root)) == 18
        err = capsys.readouterr().err
        assert f"note: 1 older extraction of cats.tar.gz (0 MB) remain: {root}; delete them" \
            in err
        # An extraction from before markers recorded the path: the same name and size count.
        legacy = tmp_path / "cache" / "cats-0123456789"
        shutil.copytree(new, legacy)
        (legacy / ".mltrain-extracted").write_text(f"size={archive.stat().st_size}\n")
        shutil.rmtree(new)
        resolve_root(archive)
        err = capsys.readouterr().err  # the first extraction (another size) is still there too
        assert "note: 2 older extractions of cats.tar.gz" in err and str(legacy) in err
    finally:
        shelf.chmod(stat.S_IRWXU)


def test_a_folder_beside_the_archive_that_mltrain_did_not_extract_is_not_used(
    tmp_path, tiny_folder, make_image_folder, monkeypatch, capsys
):
    archive = _tar(tmp_path / "cats.tar.gz", tiny_folder, "cats")
    make_image_folder(tmp_path / "cats", classes=3, per_class=2)  # the user's own, changed since
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    root = resolve_root(archive)
    assert root.parent == tmp_path / "cache" and len(read_images(root)) == 18  # the archive's
    err = capsys.readouterr().err
    assert f"note: {tmp_path / 'cats'} was not extracted from cats.tar.gz" in err
    assert len(read_images(tmp_path / "cats")) == 6  # left as it was


def test_a_relative_root_is_stored_absolute_and_a_missing_one_says_where_it_looked(
    tmp_path, tiny_folder, monkeypatch
):
    monkeypatch.chdir(tiny_folder.parent)
    assert absolute_root(tiny_folder.name) == str(tiny_folder)  # what a run's config keeps
    assert absolute_root("nowhere") == "nowhere"  # left for resolve_root to refuse
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"data root nowhere does not exist \(relative to "
                                        rf"{tmp_path}\); .*--set data.root=PATH"):
        resolve_root("nowhere")


def test_archive_changed_after_extraction(tmp_path, tiny_folder, make_image_folder):
    archive = _tar(tmp_path / "cats.tar.gz", tiny_folder, "cats")
    resolve_root(archive)
    bigger = make_image_folder(tmp_path / "bigger", classes=3, per_class=9)
    _tar(archive, bigger, "cats")
    with pytest.raises(DataError, match="changed since it was extracted"):
        resolve_root(archive)


# ---------------------------------------------------------------- splits


def test_per_class_split_fractions_and_disjoint():
    labels = np.repeat([0, 1, 2, 3], [10, 5, 2, 1])
    split = make_split(labels, "per_class", 0.6, seed=3)
    assert np.intersect1d(split.train, split.heldout).size == 0
    assert sorted(np.concatenate([split.train, split.heldout])) == list(range(18))
    train_counts = np.bincount(labels[split.train], minlength=4).tolist()
    assert train_counts == [6, 3, 1, 1]  # 2 images: 1 each side; 1 image: train only
    assert split.train.dtype == np.int64 and split.heldout.dtype == np.int64


def test_class_disjoint_split():
    labels = np.repeat(np.arange(10), 3)
    split = make_split(labels, "class_disjoint", 0.7, seed=0)
    train_cls, held_cls = set(labels[split.train]), set(labels[split.heldout])
    assert len(train_cls) == 7 and len(held_cls) == 3 and not train_cls & held_cls
    assert len(split.train) + len(split.heldout) == 30
    five = np.arange(5)  # 0.8 of 5 would hold out 1 class: kept to 2 on each side, and said
    split = make_split(five, "class_disjoint", 0.8, seed=0)
    assert len(split.train) == 3 and len(split.heldout) == 2
    assert disjoint_note(0.8, 5) == ("data.train_fraction 0.8 of 5 classes would leave fewer "
                                     "than 2 on one side; training on 3 classes, 2 held out")
    assert disjoint_note(0.7, 10) is None
    with pytest.raises(DataError, match=r"class_disjoint needs at least 4 classes .* found 3; "
                                        r"use data.split=per_class"):
        make_split(np.arange(3), "class_disjoint", 0.8, seed=0)


def test_split_determinism_and_independence_from_global_rng():
    labels = np.repeat(np.arange(5), 8)
    np.random.seed(1)
    a = make_split(labels, "per_class", 0.5, seed=7)
    np.random.seed(2)
    b = make_split(labels, "per_class", 0.5, seed=7)
    c = make_split(labels, "per_class", 0.5, seed=8)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.heldout, b.heldout)
    assert not np.array_equal(a.train, c.train)


def test_split_none_and_errors():
    split = make_split(np.array([0, 0, 1]), "none", 1.0, seed=0)
    assert split.train.tolist() == split.heldout.tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="per_class, class_disjoint, none"):
        make_split(np.array([0, 1]), "random", 0.5, seed=0)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match=f"train_fraction {bad}"):
            make_split(np.array([0, 1]), "per_class", bad, seed=0)


def test_save_load_split_round_trip_and_missing(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes=["a", "b c"], per_class=4)
    folder = read_images(root)
    split = make_split(folder.labels, "per_class", 0.5, seed=1)
    path = tmp_path / "run" / "split.json"
    save_split(path, split, folder)
    doc = json.loads(path.read_text())
    assert doc["kind"] == "per_class" and doc["train"][0][1] in ("a", "b c")
    loaded = load_split(path, read_images(root))
    assert np.array_equal(loaded.train, split.train)
    assert np.array_equal(loaded.heldout, split.heldout)
    assert (loaded.kind, loaded.seed, loaded.train_fraction) == ("per_class", 1, 0.5)
    gone = folder.paths[int(split.heldout[0])]
    gone.unlink()
    with pytest.raises(DataError, match=f"1 images .*{gone.name}"):
        load_split(path, read_images(root))
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read split file"):
        load_split(path, folder)


def test_find_duplicates(tiny_folder):
    folder = read_images(tiny_folder)
    copy = tiny_folder / "class_2" / "copy_of_0.jpg"
    shutil.copy(folder.paths[0], copy)
    paths = folder.paths + [copy]
    train, heldout = np.arange(0, 6), np.array([6, 7, 12, 18])
    assert find_duplicates(paths, train, heldout) == [(str(paths[0]), str(copy))]
    assert find_duplicates(paths, np.arange(6), np.arange(6, 18)) == []
    everything = np.arange(18)
    assert find_duplicates(folder.paths, everything, everything) == []  # split kind 'none'


# ---------------------------------------------------------------- images


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_load_image_modes(tmp_path):
    grey = load_image(_save(Image.new("L", (5, 4), 77), tmp_path / "g.png"))
    assert grey.shape == (4, 5, 3) and grey.dtype == np.uint8 and (grey == 77).all()
    cmyk = load_image(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert cmyk.shape == (8, 8, 3) and cmyk[..., 0].min() > 230 and cmyk[..., 1:].max() < 25
    deep = np.array([[0, 32896, 65535]], dtype=np.uint16)
    sixteen = _save(Image.fromarray(deep), tmp_path / "i16.png")
    assert Image.open(sixteen).mode.startswith("I")
    assert load_image(sixteen)[0, :, 0].tolist() == [0, 128, 255]
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    assert load_image(_save(rgba, tmp_path / "a.png"))[0].tolist() == [[255, 0, 0], [255] * 3]
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((2, 0), 1)
    assert load_image(_save(palette, tmp_path / "p.gif"))[0, 2].tolist() == [10, 200, 30]


def test_load_image_exif_orientation_and_draft(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees on display
    path = _save(Image.new("RGB", (40, 30), "red"), tmp_path / "o.jpg", exif=exif)
    assert load_image(path).shape == (40, 30, 3)
    big = _save(Image.new("RGB", (400, 300), "blue"), tmp_path / "big.jpg")
    assert load_image(big, size_hint=64).shape == (75, 100, 3)  # 1/4 scale, both sides >= 64
    assert load_image(big).shape == (300, 400, 3)


def _bad_files(tmp_path: Path) -> list[Path]:
    good = _save(Image.new("RGB", (64, 64), "green"), tmp_path / "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not a picture")
    return [truncated, tmp_path / "zero.jpg", tmp_path / "text.png"]


def test_load_image_bad_files_name_the_path(tmp_path):
    for bad in _bad_files(tmp_path):
        with pytest.raises(DataError, match=f"cannot read image .*{bad.name}"):
            load_image(bad)


def test_check_images_lists_exactly_the_bad_ones(tmp_path, tiny_folder):
    bad = _bad_files(tmp_path)
    paths = read_images(tiny_folder).paths[:4] + [bad[0]] + [tmp_path / "good.jpg"] + bad[1:]
    found = check_images(paths, num_workers=2)
    assert [p for p, _ in found] == [str(p) for p in bad]
    assert all(reason for _, reason in found)


# ---------------------------------------------------------------- transforms


def test_eval_transform_constant_image_normalised():
    out = eval_transform(CONFIG)(np.full((50, 60, 3), 128, np.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # (128 / 255 - mean) / std, by hand
    expected = [0.00980, 0.40784, 0.40392]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)
    assert float(out.std(dim=(1, 2)).max()) < 1e-5


def test_eval_transform_geometry_matches_timm():
    # timm: shorter side to int(32 / 0.5) = 64, then center crop 32: the central quarter.
    image = np.zeros((100, 200, 3), np.uint8)
    image[25:75, 50:150] = 255
    out = eval_transform({**CONFIG, "crop_pct": 0.5})(image)
    assert out.shape == (3, 32, 32) and torch.allclose(out[0], out[0, 0, 0])
    wide = eval_transform({**CONFIG, "input_size": (3, 24, 40), "crop_mode": "squash"})
    assert wide(np.zeros((90, 30, 3), np.uint8)).shape == (3, 24, 40)


def test_eval_center_crop_is_placed_like_torchvision():
    # torchvision (timm) crops at round((w - 32) / 2): 3.5 -> 4 for width 39, 2.5 -> 2 for 37.
    plain = {**CONFIG, "crop_pct": 1.0, "mean": (0.0,) * 3, "std": (1.0,) * 3}
    for width, left in ((39, 4), (37, 2)):
        columns = np.broadcast_to((np.arange(width) * 5)[None, :, None], (32, width, 3))
        out = eval_transform(plain)(np.ascontiguousarray(columns, dtype=np.uint8))
        assert round(float(out[0, 0, 0]) * 255) == left * 5


def test_train_transform_sizes_and_errors():
    image = np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)
    assert train_transform(CONFIG, DEFAULT_AUGMENT)(image).shape == (3, 32, 32)
    flip_only = train_transform(CONFIG, [{"name": "HorizontalFlip", "args": {"p": 1.0}}])
    assert flip_only(image).shape == (3, 32, 32)
    small = train_transform(CONFIG, [{"name": "RandomCrop", "args": {"height": 20, "width": 24}}])
    assert small(image).shape == (3, 20, 24)
    maybe = train_transform(
        CONFIG, [{"name": "RandomResizedCrop", "args": {"size": [20, 20], "p": 0.5}}]
    )
    assert {maybe(image).shape for _ in range(8)} == {(3, 32, 32)}  # p < 1: resized after
    with pytest.raises(
        ConfigError, match="unknown albumentations transform 'Flipz'.*albumentations.ai"
    ):
        train_transform(CONFIG, [{"name": "Flipz"}])
    with pytest.raises(ConfigError, match="ColorJitter: unknown args \\['brightnes'\\]"):
        train_transform(CONFIG, [{"name": "ColorJitter", "args": {"brightnes": 0.2}}])
    with pytest.raises(ConfigError, match="RandomResizedCrop: bad args"):
        train_transform(CONFIG, [{"name": "RandomResizedCrop", "args": {"scale": [0.5]}}])
    with pytest.raises(ConfigError, match="remove 'Normalize'"):
        train_transform(CONFIG, [{"name": "Normalize"}])


# ---------------------------------------------------------------- dataset and loader


def test_dataset_and_reproducible_loader(tiny_folder):
    folder = read_images(tiny_folder)
    too_big = train_transform(CONFIG, [{"name": "RandomCrop", "args": {"height": 64, "width": 64}}])
    with pytest.raises(DataError, match="img_000.jpg.*cannot crop a 32x40 image"):
        ImageDataset(folder.paths, folder.labels, too_big)[0]
    ds = ImageDataset(folder.paths, folder.labels, train_transform(CONFIG), size_hint=36)
    image, label, index = ds[7]
    assert image.shape == (3, 32, 32) and (label, index) == (1, 7)
    first = [b[2].tolist() for b in make_loader(ds, 4, shuffle=True, seed=5)]
    again = [b[2].tolist() for b in make_loader(ds, 4, shuffle=True, seed=5)]
    assert first == again and sorted(sum(first, [])) == list(range(18))
    assert first != [b[2].tolist() for b in make_loader(ds, 4, shuffle=True, seed=6)]
    assert make_loader(ds, 16).num_workers == 0  # fewer than 2 batches
    with pytest.raises(ConfigError, match="exclude each other"):
        make_loader(ds, 4, shuffle=True, sampler=build_sampler("m_per_class", ds.labels, 8))


def test_worker_augmentations_differ_and_repeat(tiny_folder, monkeypatch):
    monkeypatch.setattr(dataset_mod, "default_num_workers", lambda: 2)
    folder = read_images(tiny_folder)
    flip = [{"name": "HorizontalFlip", "args": {"p": 0.5}}, {"name": "ColorJitter"}]
    ds = ImageDataset([folder.paths[0]] * 8, [0] * 8, train_transform(CONFIG, flip))

    def run() -> torch.Tensor:
        loader = make_loader(ds, 2, seed=3)
        assert loader.num_workers == 2
        return torch.cat([b[0] for b in loader])

    a, b = run(), run()
    assert torch.equal(a, b)
    assert not torch.equal(a[0:2], a[2:4])  # workers 0 and 1 do not share one RNG stream


# ---------------------------------------------------------------- samplers


def test_m_per_class_batches(tmp_path, make_image_folder):
    folder = read_images(make_image_folder(tmp_path / "d", classes=4, per_class=[3, 5, 2, 6]))
    sampler = build_sampler({"name": "m_per_class", "args": {"m": 2}}, folder.labels, 4, seed=1)
    ds = ImageDataset(folder.paths, folder.labels, eval_transform(CONFIG))
    batches = [b[1].tolist() for b in make_loader(ds, 4, sampler=sampler, num_workers=0)]
    assert len(batches) == 4  # length_before_new_iter = 16 images
    for labels in batches:
        assert sorted(np.unique(labels, return_counts=True)[1].tolist()) == [2, 2]
    spec = {"name": "m_per_class", "args": {"m": 2}}
    one, two = (build_sampler(spec, folder.labels, 4, seed=1) for _ in range(2))
    np.random.seed(0)  # the sampler's own RNG, not numpy's global one, decides
    first = list(one)
    np.random.seed(1)
    assert first == list(two) and list(one) != first  # reproducible; epochs differ
    assert build_sampler({"name": "random"}, folder.labels, 4) is None


def test_a_class_with_one_image_sits_out_balanced_batches():
    labels = np.repeat([0, 1, 2], [4, 1, 4])  # index 4 is the lone image of 'lonely'
    names = ["ok", "lonely", "fine"]
    sampler = build_sampler({"name": "m_per_class", "args": {"m": 2}}, labels, 4, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 8 and 4 not in order
    assert set(order) <= set(range(9)) and set(labels[order]) == {0, 2}
    size, notes = fit_batch_size({"name": "m_per_class", "args": {"m": 2}}, labels, 64, names)
    assert size == 4  # 2 classes x m 2, not 3 x 2
    assert "1 class with a single training image" in notes[0] and "lonely" in notes[0]
    assert "lowered to 4" in notes[1]
    assert fit_batch_size("random", labels, 4, names) == (4, [])


def test_m_too_large_for_the_data_says_which_m_fits():
    labels = np.repeat([0, 1, 2], 2)  # 3 classes x 2 images: m 4 needs 8 images from 2 classes
    spec = {"name": "m_per_class", "args": {"m": 4}}
    with pytest.raises(ConfigError, match=r"m 4 needs batches of at least 8 .* fill at most 4; "
                                          r"lower m: --set train.sampler.args.m=2"):
        fit_batch_size(spec, labels, 64)
    size, notes = fit_batch_size({"name": "m_per_class", "args": {"m": 2}}, labels, 64)
    assert size == 6 and notes == [  # the advice works: 3 classes x 2, no image repeated
        "train.batch_size 64 lowered to 6 to fit the data (3 classes x m 2 per batch, from 6 "
        "training images in 3 classes)"
    ]
    build_sampler({"name": "m_per_class", "args": {"m": 2}}, labels, size)
    # m 20 over 44 images in 9 classes: the batch holds 2 classes, not 9 x 20
    few = np.repeat(np.arange(9), [5] * 8 + [4])
    size, notes = fit_batch_size({"name": "m_per_class", "args": {"m": 20}}, few, 64)
    assert size == 40 and notes[-1] == (
        "train.batch_size 64 lowered to 40 to fit the data (2 classes x m 20 per batch, from 44 "
        "training images in 9 classes)"
    )
    # m 3 also fits, by drawing some image twice in every class: said so
    size, notes = fit_batch_size({"name": "m_per_class", "args": {"m": 3}}, labels, 64,
                                 ["a", "b", "c"])  # fmt: skip
    assert size == 6 and notes[0] == (
        "3 classes have fewer than m=3 training images, so their images repeat within a batch "
        "(each copy augmented anew): a, b, c; lower train.sampler.args.m to avoid it"
    )
    batch = list(build_sampler({"name": "m_per_class", "args": {"m": 3}}, labels, 6, seed=0))[:6]
    assert len(set(batch)) < 6  # pml draws with replacement: the note is true
    for bad in ("abc", 0, 2.5, True):
        with pytest.raises(ConfigError, match=r"train.sampler.args.m must be a positive whole"):
            fit_batch_size({"name": "m_per_class", "args": {"m": bad}}, labels, 64)


def test_parents_draws_each_batch_from_that_many_parent_folders():
    # 12 classes of 5 images in 3 parents of 4, 5 and 3 classes; batches of 4 classes x m 2
    labels = np.repeat(np.arange(12), 5)
    groups = np.repeat([0] * 4 + [1] * 5 + [2] * 3, 5)
    spec = {"name": "m_per_class", "args": {"m": 2, "parents": 2}}
    sampler = build_sampler(spec, labels, 8, seed=3, groups=groups)
    order = list(sampler)
    assert len(order) == len(sampler) == 56  # 60 images: 7 whole batches
    for start in range(0, 56, 8):
        batch = labels[order[start:start + 8]]
        classes, counts = np.unique(batch, return_counts=True)
        assert counts.tolist() == [2, 2, 2, 2]  # m of each of 4 classes
        spread = np.unique(groups[order[start:start + 8]], return_counts=True)[1]
        assert spread.tolist() == [4, 4]  # 2 classes from each of 2 parents
    again = build_sampler(spec, labels, 8, seed=3, groups=groups)
    assert list(again) == order and list(sampler) != order  # reproducible; epochs differ
    # one parent per batch: a parent of 3 classes is topped up from the next one drawn
    one = list(build_sampler({"name": "m_per_class", "args": {"m": 2, "parents": 1}}, labels, 8,
                             seed=0, groups=groups))  # fmt: skip
    spans = [len(np.unique(groups[one[s:s + 8]])) for s in range(0, 56, 8)]
    assert set(spans) <= {1, 2} and 1 in spans
    for s in range(0, 56, 8):
        parts = np.unique(groups[one[s:s + 8]])
        assert len(parts) == 1 or 2 in parts  # only the 3-class parent needs topping up
    # a parent of one class beside one of 6: batches stay whole (4 classes x m 2)
    small = list(build_sampler(spec, np.repeat(np.arange(7), 4), 8, seed=0,
                               groups=np.repeat([0] * 6 + [1], 4)))  # fmt: skip
    assert len(small) == 24
    for s in range(0, 24, 8):
        assert np.unique(np.repeat(np.arange(7), 4)[small[s:s + 8]], return_counts=True)[
            1].tolist() == [2, 2, 2, 2]  # fmt: skip


def test_parents_needs_nested_data_and_a_whole_number():
    labels = np.repeat(np.arange(4), 3)
    flat = np.zeros(12, dtype=np.int64)
    with pytest.raises(ConfigError, match=r"parents 2: the training classes sit in 1 parent "
                                          r"folder; it needs nested data"):
        build_sampler({"name": "m_per_class", "args": {"m": 2, "parents": 2}}, labels, 4,
                      groups=flat)  # fmt: skip
    with pytest.raises(ConfigError, match="sit in 0 parent folders"):
        build_sampler({"name": "m_per_class", "args": {"m": 2, "parents": 2}}, labels, 4)
    for bad in (0, "two", True):
        with pytest.raises(ConfigError, match="train.sampler.args.parents must be a positive"):
            build_sampler({"name": "m_per_class", "args": {"m": 2, "parents": bad}}, labels, 4,
                          groups=np.repeat([0, 1], 6))  # fmt: skip
    assert build_sampler("random", labels, 4, groups=flat) is None


def test_sampler_errors():
    labels = np.repeat([0, 1, 2], [4, 1, 4])
    with pytest.raises(ConfigError, match="batch_size 6 .* m 4"):
        build_sampler({"name": "m_per_class"}, labels, 6)
    with pytest.raises(ConfigError, match="batch_size 4 .* m 4"):
        build_sampler({"name": "m_per_class"}, labels, 4)
    with pytest.raises(DataError, match="1 of 3 classes have 2 or more training images"):
        build_sampler({"name": "m_per_class", "args": {"m": 2}}, np.repeat([0, 1, 2], [4, 1, 1]),
                      4)  # fmt: skip
    with pytest.raises(ConfigError, match="m_per_class, random"):
        build_sampler({"name": "mper"}, labels, 4)
    assert SAMPLERS.names() == ["m_per_class", "random"]


# ---------------------------------------------------------------- layouts beyond Caltech101


def test_every_pillow_format_counts_as_an_image():
    from mltrain.data.folder import IMAGE_EXTENSIONS

    for ext in (".pgm", ".ppm", ".pbm", ".tif", ".webp", ".bmp", ".gif", ".jfif", ".jpe"):
        assert ext in IMAGE_EXTENSIONS
    assert not {".h5", ".mpg", ".txt", ".pdf"} & IMAGE_EXTENSIONS


def test_nested_classes_auto_and_fixed_depth(tmp_path):
    from tests.foreign_data import write_drawings

    root = write_drawings(tmp_path / "d", alphabets=2, chars=3, per_class=2, size=16)
    folder = read_images(root)
    assert folder.classes == [f"alphabet_{a}/char_{c:02d}" for a in range(2) for c in range(3)]
    assert len(folder) == 12 and np.bincount(folder.labels).tolist() == [2] * 6
    assert load_image(folder.paths[0]).shape == (16, 16, 3)  # greyscale PGM read as RGB
    top = read_images(root, class_depth=1)
    assert top.classes == ["alphabet_0", "alphabet_1"] and len(top) == 12
    assert read_images(root, exclude=["alphabet_1"]).classes == [
        f"alphabet_0/char_{c:02d}" for c in range(3)
    ]
    with pytest.raises(DataError, match="no class sub-folders"):
        read_images(root, class_depth=3)


def test_natural_order_of_numeric_names(tmp_path):
    from tests.foreign_data import write_photos

    root = write_photos(tmp_path / "p", classes=12, per_class=2)
    folder = read_images(root)
    assert folder.classes[:3] == ["c1", "c2", "c3"] and folder.classes[-1] == "c12"
    for i in (10, 2):
        shutil.copy(root / "c1" / "0.jpg", root / "c1" / f"{i}.jpg")
    assert [p.name for p in folder.paths[:2]] == ["0.jpg", "1.jpg"]
    assert [p.name for p in read_images(root).paths[:4]] == ["0.jpg", "1.jpg", "2.jpg", "10.jpg"]


def test_numeric_exclusion_from_yaml(tmp_path, make_image_folder):
    from mltrain.config import load_config

    root = make_image_folder(tmp_path / "d", classes=["2", "10", "7"], per_class=2)
    cfg = load_config(None, [f"data.root={root}", "data.exclude_classes=[10]"])
    assert cfg.data.exclude_classes == ["10"]
    assert read_images(root, exclude=cfg.data.exclude_classes).classes == ["2", "7"]


def test_labels_csv(tmp_path):
    from tests.foreign_data import write_csv_folder

    csv_path = write_csv_folder(tmp_path / "cat", classes=3, per_class=4)
    folder = read_images(csv_path, exclude=["product 2", "nothing"])
    assert folder.root == csv_path.parent and folder.classes == ["product 0", "product 1"]
    assert folder.paths[0] == csv_path.parent / "images" / "0000.png" and len(folder) == 8
    assert folder.notes == [f"data.exclude_classes: no label 'nothing' in {csv_path}; "
                            "nothing excluded for it"]  # fmt: skip
    headerless = tmp_path / "cat" / "plain.csv"
    headerless.write_text("images/0000.png,a\nimages/0001.png,a\nimages/0005.png,b\n")
    assert read_images(headerless).classes == ["a", "b"]
    bad = tmp_path / "cat" / "bad.csv"
    bad.write_text("path,label\nimages/0000.png,a\n../../etc/passwd,b\nmissing.png,b\nonly\n")
    with pytest.raises(DataError, match=r"3 bad rows in .*line 3: \.\./\.\./etc/passwd lies "
                                        r"outside.*line 4: missing.png does not exist.*line 5"):
        read_images(bad)
    inside = tmp_path / "cat" / "images" / "0000.png"  # inside, but absolute: not taken
    bad.write_text(f"path,label\n{inside},a\n")
    with pytest.raises(DataError, match=rf"line 2: {inside} is an absolute path; write it "
                                        rf"relative to {tmp_path / 'cat'}"):
        read_images(bad)


def test_a_file_listed_with_two_labels_is_a_bad_row_and_skip_passes_over_missing_files(
    tmp_path,
):
    """A CSV listing one image as 'digit 0' and again as 'digit 1' is a bad row (it would train
    as both); with data.bad_images: skip, rows naming missing files are left out with a note."""
    from tests.foreign_data import write_csv_folder

    csv_path = write_csv_folder(tmp_path / "cat", classes=2, per_class=4)
    twice = tmp_path / "cat" / "twice.csv"
    twice.write_text("path,label\nimages/0000.png,a\nimages/0001.png,a\nimages/0004.png,b\n"
                     "./images/0000.png,b\nimages/0001.png,a\n")  # fmt: skip
    with pytest.raises(DataError) as info:
        read_images(twice)
    assert str(info.value) == (
        f"1 bad row in {twice}: line 5: ./images/0000.png is listed again as 'b' (line 2 says "
        "'a'); paths are relative to the CSV's folder; fix or delete those rows"
    )  # a repeat with the same label (line 6) is no problem: see below
    twice.write_text("path,label\nimages/0000.png,a\nimages/0001.png,a\nimages/0004.png,b\n"
                     "images/0005.png,b\nimages/0001.png,a\n")  # fmt: skip
    folder = read_images(twice)
    assert len(folder) == 4 and folder.notes == [
        f"left out 1 repeated row of {twice} (the same file and label as an earlier row): "
        "line 6 (as line 3)"]
    gaps = tmp_path / "cat" / "gaps.csv"
    gaps.write_text("path,label\nimages/0000.png,a\nimages/0001.png,a\ngone.png,a\n"
                    "images/0004.png,b\nimages/0005.png,b\n")  # fmt: skip
    with pytest.raises(DataError, match="line 4: gone.png does not exist"):
        read_images(gaps)
    folder = read_images(gaps, bad_images="skip")
    assert len(folder) == 4 and folder.notes == [
        f"data.bad_images: skip left out 1 row of {gaps} naming no file: line 4: gone.png does "
        "not exist"]
    assert read_images(csv_path, bad_images="skip").notes == []


def test_hostile_trees_skip_loops_fifos_and_symlinked_folders(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    outside = make_image_folder(tmp_path / "outside", classes=1, per_class=2)
    (root / "class_0" / "loop").symlink_to("..")
    (root / "class_1" / "away").symlink_to(outside / "class_0")
    (root / "class_1" / "stolen.jpg").symlink_to(outside / "class_0" / "img_000.jpg")
    (root / "class_1" / "alias.png").symlink_to(root / "class_0" / "img_001.png")
    os.mkfifo(root / "class_0" / "pipe.jpg")
    folder = read_images(root)
    assert folder.classes == ["class_0", "class_1"]
    names = [p.relative_to(root).as_posix() for p in folder.paths]
    assert names == ["class_0/img_000.jpg", "class_0/img_001.png", "class_0/img_002.jpg",
                     "class_1/alias.png", "class_1/img_000.jpg", "class_1/img_001.png",
                     "class_1/img_002.jpg", "class_1/stolen.jpg"]  # fmt: skip
    text = "\n".join(folder.notes)  # file links are one image each; folder links never followed
    for skipped in ("loop", "away", "pipe.jpg"):
        assert f"/{skipped} (" in text
    assert len(folder.notes) == 3


def test_without_a_run_folder_the_skipped_images_are_listed_in_the_message(
    tmp_path, make_image_folder, capsys
):
    from mltrain.config import load_config
    from mltrain.data.pipeline import prepare_data

    root = make_image_folder(tmp_path / "d", classes=2, per_class=5)
    for i in range(5):
        (root / "class_0" / f"broken_{i}.jpg").write_bytes(b"not an image")
    cfg = load_config(None, [f"data.root={root}", "data.bad_images=skip"])
    data = prepare_data(cfg)  # as evaluate and export call it: no run folder, no files
    assert len(data.folder) == 10
    err = capsys.readouterr().err
    assert "skipping 5 unreadable images, the first ones:\n  " in err and "broken_0.jpg" in err
    assert "... and 2 more" in err and "bad_images.txt" not in err
    assert not list(tmp_path.rglob("bad_images.txt"))


def test_a_class_depth_deeper_than_the_images_is_named(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=2)
    with pytest.raises(DataError, match=r"data.class_depth 3 may be deeper than the images: try "
                                        r"auto$"):
        read_images(root, class_depth=3)


def test_empty_and_hidden_class_folders_are_noted_not_dropped_silently(
    tmp_path, make_image_folder
):
    """A hidden `.2dot` class of 12 images and an `empty class` folder are left out with a
    note, not silently; a hidden folder without images (.git) stays quiet."""
    root = make_image_folder(tmp_path / "d", classes=3, per_class=2)
    (root / "empty class").mkdir()
    (root / "b_only_hidden").mkdir()
    (root / "b_only_hidden" / ".DS_Store").write_bytes(b"\0")
    shutil.copytree(root / "class_0", root / ".2dot")
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    folder = read_images(root)
    assert folder.classes == ["class_0", "class_1", "class_2"]
    assert folder.notes == [
        "empty folders were left out: b_only_hidden, empty class",
        "hidden folders holding images were left out: .2dot (names starting with '.' are "
        "skipped; rename them to use them)",
    ]


@pytest.mark.parametrize("text", ["path,label\n", "path,label\n\n  \n", "\ufefffile,class\n"])
def test_labels_csv_with_only_a_header_says_it_has_no_rows(tmp_path, text):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_images(csv_path)
    assert str(info.value) == (f"labels file {csv_path} has a header row but no image rows; "
                               "write one 'path,label' row per image below it")  # fmt: skip
