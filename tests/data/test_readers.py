"""The one entry point for data roots: which reader reads what, the `kind:` prefix, and the
paths a run records and compares."""

from __future__ import annotations

import ast
import shutil
import tarfile
from pathlib import Path

import pytest

from mltrain.data.archive import ArchiveReader
from mltrain.data.folder import FolderReader
from mltrain.data.labels_csv import LabelsCsvReader
from mltrain.data.readers import (
    READERS,
    absolute_root,
    open_reader,
    read_images,
    readable_root,
)
from mltrain.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "mltrain" / "data"


def test_each_root_goes_to_its_reader(tmp_path, tiny_folder):
    from tests.foreign_data import write_csv_folder

    csv_path = write_csv_folder(tmp_path / "cat", classes=2, per_class=3)
    archive = tmp_path / "cats.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_folder, arcname="cats")
    assert READERS.names() == ["archive", "csv", "folder"]
    assert type(open_reader(tiny_folder)) is FolderReader
    assert type(open_reader(csv_path)) is LabelsCsvReader
    reader = open_reader(archive)
    assert type(reader) is ArchiveReader and reader.base() is None  # not extracted yet
    assert read_images(archive).classes == ["class_0", "class_1", "class_2"]
    assert reader.base() == tmp_path / "cats" == readable_root(archive)
    assert readable_root(csv_path) == csv_path.parent and readable_root(tmp_path / "no") is None


def test_a_prefix_names_the_reader(tmp_path, monkeypatch):
    """`csv:labels.txt` reads a labels file whose name does not say CSV; a run keeps the
    prefix on the absolute path; a folder whose name has a colon is still a folder."""
    from tests.foreign_data import write_csv_folder

    csv_path = write_csv_folder(tmp_path / "cat", classes=2, per_class=3)
    txt = csv_path.rename(csv_path.with_suffix(".txt"))
    with pytest.raises(DataError, match="neither .* nor a folder; .*csv:labels.txt"):
        read_images(txt)
    monkeypatch.chdir(tmp_path)
    assert len(read_images("csv:cat/labels.txt")) == 6
    assert absolute_root("csv:cat/labels.txt") == f"csv:{txt}"
    assert absolute_root("csv:cat/nothing.txt") == "csv:cat/nothing.txt"
    with pytest.raises(DataError, match="data root cat/nothing.txt does not exist"):
        read_images("csv:cat/nothing.txt")
    colon = tmp_path / "csv:photos"
    shutil.copytree(tmp_path / "cat" / "images", colon / "a")
    shutil.copytree(tmp_path / "cat" / "images", colon / "b")
    assert read_images("csv:photos").classes == ["a", "b"]


def test_readers_do_not_import_each_other_or_the_entry_point():
    """Each reader depends on `labelled` only (the archive also on the folder reader it
    extracts for), so the registry can import them on demand without a circle."""
    allowed = {
        "folder.py": {"mltrain.data.labelled"},
        "labels_csv.py": {"mltrain.data.labelled"},
        "archive.py": {"mltrain.data.labelled", "mltrain.data.folder"},
    }
    for name, ok in allowed.items():
        tree = ast.parse((DATA / name).read_text())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert {m for m in found if m and m.startswith("mltrain.data")} == ok, name


def test_a_folder_inside_an_archive_is_a_data_root(tmp_path, tiny_folder, monkeypatch):
    """`faces_small.tar.gz/IMM`: one set of an archive that holds several, read and recorded
    like a folder; a missing or escaping folder is one line naming the archive's folders."""
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "sets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_folder, arcname="sets/A")
        tar.add(tiny_folder / "class_0", arcname="sets/B/x")
        tar.add(tiny_folder / "class_1", arcname="sets/B/y")
    assert read_images("sets.tar.gz/A").classes == ["class_0", "class_1", "class_2"]
    assert read_images("sets.tar.gz/B").classes == ["x", "y"]
    assert readable_root("sets.tar.gz/A") == tmp_path / "sets" / "A"
    assert absolute_root("sets.tar.gz/A") == str(tmp_path / "sets.tar.gz" / "A")
    with pytest.raises(DataError, match=r"^data root sets.tar.gz/C: the archive holds no "
                       "folder C; its folders: A, B$"):  # fmt: skip
        read_images("sets.tar.gz/C")
    with pytest.raises(DataError, match="without '..'"):
        read_images("sets.tar.gz/../x")
    with pytest.raises(DataError, match="does not exist"):
        read_images("nothing.tar.gz/A")
    # a folder of images without class folders: the error names the archive, not the cache
    with pytest.raises(DataError, match=r"^data root sets.tar.gz/B/x has no class sub-folders"):
        read_images("sets.tar.gz/B/x")
