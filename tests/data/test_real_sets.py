"""Real sets as they are distributed: images whose names carry no image extension (GIF faces
named subject01.glasses) and byte-identical copies among the evaluated images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from mltrain.config import load_config
from mltrain.data.folder import sniff_image
from mltrain.data.images import load_image
from mltrain.data.pipeline import prepare_data
from mltrain.data.readers import read_images
from mltrain.data.splits import duplicates_within
from mltrain.errors import DataError
from tests.conftest import TINY_EMBED, write_image_folder


def write_faces(root, people=("subject01", "subject02"), moods=("glasses", "happy", "sad")):
    """`root/<person>/<person>.<mood>`: grey GIFs without an image extension."""
    rng = np.random.default_rng(0)
    for p, person in enumerate(people):
        (root / person).mkdir(parents=True, exist_ok=True)
        for mood in moods:
            pixels = np.clip(60 * p + rng.integers(0, 40, (24, 20)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / person / f"{person}.{mood}", format="GIF")
    return root


def test_images_without_an_image_extension_are_read_by_their_content(tmp_path):
    root = write_faces(tmp_path / "yale")
    (root / "subject01" / "README").write_text("P5 is not a picture")  # a signature, no image
    (root / "subject01" / "info.glasses").write_bytes(b"GIF89a but truncated")
    folder = read_images(root)
    assert folder.classes == ["subject01", "subject02"]
    assert [p.name for p in folder.paths] == [
        "subject01.glasses", "subject01.happy", "subject01.sad",
        "subject02.glasses", "subject02.happy", "subject02.sad",
    ]  # fmt: skip
    assert [n for n in folder.notes if "by their content" in n] == [
        f"read 6 GIF files as images by their content (their names do not end in an image "
        f"extension), e.g. {root / 'subject01' / 'subject01.glasses'}"
    ]
    assert load_image(folder.paths[0]).shape == (24, 20, 3)
    assert sniff_image(root / "subject01" / "README") is None
    assert sniff_image(root / "subject01" / "info.glasses") is None
    assert sniff_image(folder.paths[3]) == "GIF"


def test_a_flat_folder_of_images_says_where_they_are(tmp_path):
    root = write_faces(tmp_path / "yale", people=("subject01",))
    for f in (root / "subject01").iterdir():
        shutil.move(f, root / f.name)
    with pytest.raises(DataError, match=r"no class sub-folders with images, but 3 images lie in "
                       r"it \(e\.g\. subject01\.glasses\); move each class's images into a "
                       "folder of its own"):  # fmt: skip
        read_images(root)


def test_duplicates_within_keeps_the_first_of_each_identical_group(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, per_class=3)
    paths = sorted(root.rglob("img_*"))  # class_0: 0, 1, 2; class_1: 3, 4, 5
    shutil.copy(paths[0], paths[2].with_suffix(".jpg"))  # img_002 is a .jpg already
    paths[4].unlink()
    shutil.copy(paths[0], paths[4].with_suffix(".jpg"))
    paths = [paths[0], paths[1], paths[2], paths[3], paths[4].with_suffix(".jpg"), paths[5]]
    assert duplicates_within(paths, np.arange(6)) == [(2, 0), (4, 0)]
    assert duplicates_within(paths, np.array([1, 2, 4])) == [(4, 2)]
    assert duplicates_within(paths, np.array([1, 3, 5])) == []


def test_copies_among_evaluated_images_are_left_out_with_a_note(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", classes=3, per_class=4)
    # class_0/img_001.png becomes a copy of class_0/img_000.jpg (same class: a perfect hit);
    # class_2/img_000.jpg becomes a copy of class_1/img_003.png (another class)
    (root / "class_0" / "img_001.png").write_bytes((root / "class_0" / "img_000.jpg").read_bytes())
    (root / "class_2" / "img_000.jpg").write_bytes((root / "class_1" / "img_003.png").read_bytes())
    cfg = load_config(None, [*TINY_EMBED, f"data.root={root}", "data.split=none"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = prepare_data(cfg, run_dir)
    # every image is evaluated with split none: all 12 but the two later copies
    assert len(data.split.train) == 12
    dropped = sorted(set(range(12)) - set(data.split.heldout.tolist()))
    assert [data.folder.paths[i].relative_to(root).as_posix() for i in dropped] == [
        "class_0/img_001.png", "class_2/img_000.jpg"
    ]
    note = ("left out 2 byte-identical copies of other evaluated images (each would find its "
            "twin as a perfect hit); 1 of them copy an image of another class: check their "
            "labels (listed in duplicates_evaluated.txt)")  # fmt: skip
    assert f"note: {note}" in capsys.readouterr().err
    assert note in data.folder.notes and note in (run_dir / "notes.txt").read_text()
    listed = (run_dir / "duplicates_evaluated.txt").read_text()
    assert "class_2/img_000.jpg  ==  " in listed and "(another class)" in listed
    # export reports no figures: it keeps every image
    assert len(prepare_data(cfg, duplicates=False).split.heldout) == 12


def test_a_folder_of_extensionless_images_exports_loads_and_searches(tmp_path, capsys):
    """The bundle of such a folder loads, and its rows are read back as images."""
    from mltrain.commands.search import script as search_main
    from mltrain.retrieval.bundle import load_bundle, safe_image_path
    from mltrain.retrieval.export import export_bundle
    from tests.conftest import tiny_embedder

    root = write_faces(tmp_path / "yale", people=("subject01", "subject02", "subject03"))
    out = export_bundle(tiny_embedder(root, k=3), tmp_path / "b", "extension-less faces")
    bundle = load_bundle(out)
    assert all(load_image(safe_image_path(bundle, m["path"])).ndim == 3 for m in bundle.metadata)
    query = root / "subject02" / "subject02.happy"
    assert search_main([str(out), str(query), "-k", "1"]) == 0
    assert "subject02.happy" in capsys.readouterr().out
