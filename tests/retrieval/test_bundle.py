"""Search bundles: export, validation on load, add_images and path safety (tiny random models)."""

from __future__ import annotations

import csv
import json
import shutil
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

import mltrain.retrieval.export as export_mod
import mltrain.retrieval.gallery as gallery_mod
from mltrain.errors import BundleError, ConfigError, DataError
from mltrain.files import sha256_file
from mltrain.inference.embedder import Embedder
from mltrain.retrieval.add import add_images
from mltrain.retrieval.bundle import load_bundle, safe_image_path
from mltrain.retrieval.bundle_model import bundle_embedder
from mltrain.retrieval.export import export_bundle
from mltrain.retrieval.index import search
from mltrain.retrieval.search import search_images
from mltrain.retrieval.shards import ShardReader
from tests.conftest import gallery, tiny_embedder, write_image_folder

CLASSES, PER_CLASS = 3, 5


def make_embedder_for(root: Path) -> Embedder:
    return tiny_embedder(root, "resnet18", 64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> Embedder:
    """A random resnet18 over 3 classes x 5 images of 32 px (built once per module)."""
    root = write_image_folder(tmp_path_factory.mktemp("images") / "data", CLASSES, PER_CLASS,
                              (32, 32))  # fmt: skip
    return make_embedder_for(root)


@pytest.fixture(scope="module")
def exported(embedder, tmp_path_factory):
    """One flat bundle per module; tests that change it work on a copy (`bundle_dir`)."""
    out = export_bundle(embedder, tmp_path_factory.mktemp("bundle") / "b", "test export")
    return Path(embedder.cfg.data.root), out


@pytest.fixture(scope="module")
def loaded(exported):
    """The exported bundle loaded once, its model built once (read-only tests)."""
    return load_bundle(exported[1])


@pytest.fixture
def bundle_dir(exported, tmp_path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(exported[1], copy)
    return copy


def image_paths(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".png"))


def write_new_class(root: Path, name: str, n: int) -> Path:
    """`root/<name>/new_N.png`: striped images unlike any in the exported folder, and unlike
    those of another `root/<name>` (add refuses one file under two classes)."""
    (root / name).mkdir(parents=True)
    rng = np.random.default_rng(zlib.crc32(str(root / name).encode()))
    for i in range(n):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        pixels[:, ::4] = 0
        Image.fromarray(pixels).save(root / name / f"new_{i}.png")
    return root


def rewrite_metadata(bundle: Path, edit) -> None:
    """Edit metadata.csv rows and re-sign it in the manifest (so only the edit is wrong)."""
    with open(bundle / "metadata.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows = [rows[0], *edit(rows[1:])]
    with open(bundle / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["metadata.csv"] = sha256_file(bundle / "metadata.csv")
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_export_writes_complete_manifest_and_rows(exported):
    root, out = exported
    names = sorted(p.name for p in out.iterdir())
    assert names == ["embeddings.npy", "index.faiss", "manifest.json", "metadata.csv", "model.pt"]
    m = json.loads((out / "manifest.json").read_text())
    n = CLASSES * PER_CLASS
    assert m["count"] == n and m["embedding_dim"] == 512 and m["dtype"] == "float32"
    assert m["index"]["kind"] == "flat" and m["index"]["ntotal"] == n and m["index"]["bytes"] > 0
    assert m["image_root"] == str(root.resolve()) and m["metric"] == "cosine"
    assert m["num_classes"] == 0 and m["source"] == "test export"
    assert {"mltrain", "torch", "timm", "faiss", "numpy"} <= set(m["versions"])
    assert m["config"]["model"]["backbone"] == "resnet18"
    for name, digest in m["files"].items():
        assert sha256_file(out / name) == digest
    b = load_bundle(out)
    assert [r["path"] for r in b.metadata] == [
        p.relative_to(root).as_posix() for p in image_paths(root)
    ]
    assert {r["split"] for r in b.metadata} == {"train", "heldout"}
    assert all(r["class"] == Path(r["path"]).parent.name for r in b.metadata)
    assert all(b.classes[r["label"]] == r["class"] for r in b.metadata)
    assert isinstance(b.embeddings, np.memmap) and not b.embeddings.flags.writeable


def test_every_image_finds_itself_first(exported, loaded):
    root, b = exported[0], loaded
    run = search_images(b, image_paths(root), k=3)
    for r in run.results:
        assert r.error is None
        top = r.hits[0]
        assert (root / top.path) == Path(r.query)
        assert top.score == pytest.approx(1.0, abs=1e-3)
        assert r.search_us is not None and r.search_us > 0


def test_hnsw_with_pca_and_float16_round_trip(exported, embedder, tmp_path):
    root = exported[0]
    out = export_bundle(embedder, tmp_path / "hnsw", "hnsw test", "hnsw", 8, "float16")
    b = load_bundle(out)
    assert b.embeddings.dtype == np.float16
    assert isinstance(faiss.downcast_index(b.index), faiss.IndexPreTransform)
    assert b.manifest["index"]["pca_dim"] == 8 and b.manifest["config"]["export"]["pca_dim"] == 8
    run = search_images(b, image_paths(root), k=2)
    for r in run.results:
        assert root / r.hits[0].path == Path(r.query)
        assert r.hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_bundle_holds_no_pickles(exported):
    _, out = exported
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".joblib")]
    emb = np.load(out / "embeddings.npy", allow_pickle=False)
    assert emb.shape == (CLASSES * PER_CLASS, 512) and emb.dtype == np.float32
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    json.loads((out / "manifest.json").read_text())  # plain JSON


def test_bundle_embedder_reproduces_the_stored_embeddings(exported, loaded):
    root, b = exported[0], loaded
    e = bundle_embedder(b).embed(image_paths(root)[:4])
    np.testing.assert_allclose(e, np.asarray(b.embeddings[:4]), atol=1e-4)
    assert bundle_embedder(b) is bundle_embedder(b)  # built once per loaded bundle


@pytest.mark.parametrize(
    "name", ["embeddings.npy", "metadata.csv", "index.faiss", "model.pt", "manifest.json"]
)
def test_load_refuses_missing_file(bundle_dir, name):
    (bundle_dir / name).unlink()
    with pytest.raises(BundleError, match=name.replace(".", r"\.")) as e:
        load_bundle(bundle_dir)
    assert "re-export" in str(e.value)


def test_load_refuses_truncated_or_modified_embeddings(bundle_dir):
    path = bundle_dir / "embeddings.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-64])
    with pytest.raises(BundleError, match=r"embeddings\.npy.*sha256"):
        load_bundle(bundle_dir)
    modified = bytearray(data)
    modified[-5] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(modified))
    with pytest.raises(BundleError, match=r"embeddings\.npy.*sha256"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("key,value", [("count", 14), ("embedding_dim", 256)])
def test_load_refuses_manifest_that_disagrees_with_files(bundle_dir, key, value):
    mpath = bundle_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    m[key] = value
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"embeddings\.npy has shape \(15, 512\)"):
        load_bundle(bundle_dir)


def test_load_refuses_metadata_with_fewer_rows(bundle_dir):
    rewrite_metadata(bundle_dir, lambda rows: rows[:-1])
    with pytest.raises(BundleError, match=r"metadata\.csv has 14 rows.*15"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("bad", ["../outside.jpg", "class_0/../../x.jpg", "/etc/passwd"])
def test_load_refuses_metadata_paths_that_escape(bundle_dir, bad):
    rewrite_metadata(bundle_dir, lambda rows: [[bad, *rows[0][1:]], *rows[1:]])
    with pytest.raises(BundleError, match="unsafe"):
        load_bundle(bundle_dir)


def test_safe_image_path_refuses_escapes(exported, tmp_path):
    root, out = exported
    b = load_bundle(out)
    assert safe_image_path(b, b.metadata[0]["path"]) == (root / b.metadata[0]["path"]).resolve()
    for bad in ["../secret.jpg", "class_0/../../secret.jpg", str(tmp_path / "x.jpg"), ""]:
        with pytest.raises(BundleError):
            safe_image_path(b, bad)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"not yours")
    link_root = tmp_path / "root"
    (link_root / "class_0").mkdir(parents=True)
    (link_root / "class_0" / "link.jpg").symlink_to(outside)
    b.root = link_root
    with pytest.raises(BundleError, match="outside"):
        safe_image_path(b, "class_0/link.jpg")


def test_loading_and_one_query_rebuild_and_re_embed_nothing(exported, monkeypatch):
    root, out = exported

    def forbidden(*a, **k):
        raise AssertionError("the index must not be rebuilt")

    monkeypatch.setattr(gallery_mod, "build_index", forbidden)
    monkeypatch.setattr(faiss.Index, "train", forbidden, raising=False)
    calls: list[int] = []
    original = Embedder.embed

    def counting(self, paths, labels=None, desc="embedding"):
        calls.append(len(paths))
        return original(self, paths, labels, desc)

    monkeypatch.setattr(Embedder, "embed", counting)
    b = load_bundle(out)
    run = search_images(b, [image_paths(root)[7]], k=1)
    assert calls == [1]
    assert run.results[0].hits[0].row == 7


def test_add_images_grows_the_bundle_and_finds_the_new_image(bundle_dir, tmp_path):


    new = write_new_class(tmp_path / "new", "zebra", 2)
    before = load_bundle(bundle_dir)
    n0, classes0 = len(before), before.classes
    assert add_images(bundle_dir, new) == 2
    b = load_bundle(bundle_dir)
    assert len(b) == n0 + 2 and b.index.ntotal == n0 + 2 and b.embeddings.shape[0] == n0 + 2
    assert b.classes == [*classes0, "zebra"]
    added = b.metadata[-2:]
    assert [r["split"] for r in added] == ["added", "added"]
    assert all(r["path"].startswith("bundle:images/zebra/") for r in added)
    assert safe_image_path(b, added[0]["path"]).is_file()
    query = new / "zebra" / "new_1.png"
    hit = search_images(b, [query], k=1).results[0].hits[0]
    assert hit.row == n0 + 1 and hit.cls == "zebra"
    assert hit.score == pytest.approx(1.0, abs=1e-3)
    assert add_images(bundle_dir, new) == 0  # the same files again: already copied in
    assert len(load_bundle(bundle_dir)) == n0 + 2
    # The same file under another class would be enrolled twice, two labels on one image
    one = new / "zebra" / "new_0.png"
    with pytest.raises(DataError) as info:
        add_images(bundle_dir, [one], "horse")
    assert str(info.value) == (
        f"{one} was added before into images/zebra/, another class than 'horse'; adding it "
        "again would give one image two classes: leave it out, or name the class it has with "
        "--class")
    assert add_images(bundle_dir, [one], "zebra") == 0 and len(load_bundle(bundle_dir)) == n0 + 2
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".b.")]


def test_add_images_names_nested_classes_as_the_data_scanner_does(bundle_dir, tmp_path, capsys):
    """A folder of alphabets of characters adds classes `greek/alpha`, `greek/beta`, not one
    class `greek`; loose images take the folder's name, as before, now with a note (training
    leaves such strays out)."""
    new = tmp_path / "new"
    write_new_class(new / "greek", "alpha", 1)
    write_new_class(new / "greek", "beta", 2)
    write_new_class(tmp_path / "loose", "x", 1)
    shutil.copy(tmp_path / "loose" / "x" / "new_0.png", new / "new_0.png")  # loose in new/
    assert add_images(bundle_dir, new) == 4
    assert (f"note: 1 loose image beside the class folders of {new} (e.g. new_0.png) added as "
            "class 'new'; move them into a class folder") in capsys.readouterr().err
    added = load_bundle(bundle_dir).metadata[-4:]
    assert [r["class"] for r in added] == ["new", "greek/alpha", "greek/beta", "greek/beta"]
    assert added[1]["path"].startswith("bundle:images/greek_alpha/")
    mixed = tmp_path / "mixed"  # with --class every image is that class: no note to make
    write_new_class(mixed, "gamma", 1)
    shutil.copy(tmp_path / "loose" / "x" / "new_0.png", mixed / "stray.png")
    assert add_images(bundle_dir, mixed, "one") == 2
    assert "note:" not in capsys.readouterr().err
    assert [r["class"] for r in load_bundle(bundle_dir).metadata[-2:]] == ["one", "one"]


def test_adding_a_nested_folder_notes_its_classes_beside_the_bundles_nested_ones(
    bundle_dir, tmp_path, capsys
):
    """Classes are named from the folder added: `data/greek` adds `alpha`, a class apart
    from `greek/alpha`; the note says so and how to add to the nested one."""
    write_new_class(tmp_path / "data" / "greek", "alpha", 1)
    assert add_images(bundle_dir, tmp_path / "data") == 1
    capsys.readouterr()
    write_new_class(tmp_path / "more" / "greek", "alpha", 2)
    assert add_images(bundle_dir, tmp_path / "more" / "greek") == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "note: new class 'alpha' is apart from the bundle's 'greek/alpha': classes are named "
        "from the folder added; add its parent folder, or pass --class, to add to one of those"
    )
    assert load_bundle(bundle_dir).classes[-2:] == ["greek/alpha", "alpha"]


def test_an_empty_class_name_is_refused_and_a_repeat_add_says_why_nothing_was_added(
    bundle_dir, tmp_path, capsys
):
    from mltrain.commands.add import main

    new = write_new_class(tmp_path / "new", "zebra", 1)
    with pytest.raises(ConfigError, match="^a class name is empty; pass a name with --class NAME$"):
        add_images(bundle_dir, new, label_names=" ")
    assert main([str(bundle_dir), str(new)]) == 0
    capsys.readouterr()
    assert main([str(bundle_dir), str(new)]) == 0
    total = len(load_bundle(bundle_dir))
    assert capsys.readouterr().out.strip() == (
        f"added 0 images to {bundle_dir} (now {total}): every one was already in it"
    )


def test_add_images_under_the_image_root_is_not_duplicated(exported, embedder, tmp_path):
    root = exported[0]
    bdir = export_bundle(embedder, tmp_path / "hnsw", "test", index="hnsw")
    assert add_images(bdir, [image_paths(root)[0]]) == 0  # already in the bundle
    extra = root / "class_0" / "zz_extra.jpg"
    shutil.copy(image_paths(root)[0], extra)
    try:
        assert add_images(bdir, [extra], label_names="class_2") == 1
    finally:
        extra.unlink()
    b = load_bundle(bdir)
    assert len(b) == CLASSES * PER_CLASS + 1 and b.index.ntotal == len(b)
    assert b.metadata[-1]["path"] == "class_0/zz_extra.jpg"  # referenced in place, not copied
    assert b.metadata[-1]["class"] == "class_2" and b.metadata[-1]["label"] == 2
    assert not (bdir / "images").exists()


def test_interrupted_export_leaves_no_bundle(embedder, tmp_path, monkeypatch):

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gallery_mod, "save_index", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(embedder, tmp_path / "out", "test")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_a_folder_that_is_not_a_bundle(embedder, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a search bundle"):
        export_bundle(embedder, tmp_path / "notes", "test")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_export_replaces_an_older_bundle_whole(exported, embedder, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(exported[1], target)
    (target / "embeddings-00007.npy").write_bytes(b"a shard of an older, sharded export")
    export_bundle(embedder, target, "second export", index="hnsw")
    b = load_bundle(target)
    assert b.manifest["source"] == "second export" and b.manifest["index"]["kind"] == "hnsw"
    assert not (target / "embeddings-00007.npy").exists()  # a user's own files: refused, below
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folders left


# --- sharded bundles (export.shard_size smaller than the gallery) ---------------------------

SHARDS = [f"embeddings-0000{i}.npy" for i in range(4)]  # 15 images in shards of 4


@pytest.fixture(scope="module")
def sharded(embedder, tmp_path_factory) -> Path:
    return export_bundle(embedder, tmp_path_factory.mktemp("sharded") / "b", "sharded export",
                         shard_size=4)  # fmt: skip


@pytest.fixture
def sharded_dir(sharded, tmp_path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(sharded, copy)
    return copy


def edit_manifest(bundle: Path, edit) -> None:
    mpath = bundle / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))


def test_sharded_export_matches_the_single_file_export(exported, loaded, sharded):
    root = exported[0]
    assert sorted(p.name for p in sharded.iterdir()) == sorted(
        [*SHARDS, "index.faiss", "manifest.json", "metadata.csv", "model.pt"]
    )
    m = json.loads((sharded / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["count"] == CLASSES * PER_CLASS
    assert [s["name"] for s in m["shards"]] == SHARDS
    assert [s["rows"] for s in m["shards"]] == [4, 4, 4, 3]
    assert all(sha256_file(sharded / s["name"]) == s["sha256"] for s in m["shards"])
    assert sorted(m["files"]) == ["index.faiss", "metadata.csv", "model.pt"]
    assert m["config"]["export"]["shard_size"] == 4
    b = load_bundle(sharded)
    assert isinstance(b.embeddings, ShardReader) and b.embeddings.shape == (15, 512)
    np.testing.assert_allclose(np.asarray(b.embeddings), np.asarray(loaded.embeddings),
                               atol=1e-5)  # fmt: skip
    assert b.metadata == loaded.metadata
    # the exact (flat) indexes answer every image with the same neighbours
    queries = np.asarray(loaded.embeddings)
    s1, i1 = search(loaded.index, queries, 5, "cosine")
    s2, i2 = search(b.index, queries, 5, "cosine")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    hit = search_images(b, [image_paths(root)[7]], k=1).results[0].hits[0]
    assert hit.row == 7 and hit.score == pytest.approx(1.0, abs=1e-3)


def test_sharded_export_with_pca_float16_and_hnsw_finds_every_image(exported, embedder,
                                                                    tmp_path):
    root = exported[0]
    out = export_bundle(embedder, tmp_path / "s", "test", "hnsw", 8, "float16", shard_size=6)
    b = load_bundle(out)
    assert len(b.embeddings.paths) == 3 and b.embeddings.dtype == np.float16
    assert isinstance(faiss.downcast_index(b.index), faiss.IndexPreTransform)
    for r in search_images(b, image_paths(root), k=2).results:
        assert root / r.hits[0].path == Path(r.query)


def test_auto_index_is_hnsw_for_a_small_gallery_and_ivf_hnsw_past_the_threshold(
        exported, embedder, tmp_path, monkeypatch):  # fmt: skip
    root = exported[0]
    small = load_bundle(export_bundle(embedder, tmp_path / "small", "test", index="auto"))
    assert small.manifest["index"]["kind"] == "hnsw"
    assert small.manifest["config"]["export"]["index"] == "hnsw"  # what ran, never auto
    monkeypatch.setattr(export_mod, "AUTO_IVF_HNSW_ROWS", 10)  # the 15 images are past it
    out = export_bundle(embedder, tmp_path / "large", "test", index="auto", shard_size=6)
    b = load_bundle(out)
    assert b.manifest["index"]["kind"] == b.manifest["config"]["export"]["index"] == "ivf_hnsw"
    assert len(b.embeddings.paths) == 3  # the sharded path, trained on a sample
    graph = faiss.downcast_index(faiss.extract_index_ivf(b.index).quantizer)
    assert isinstance(graph, faiss.IndexHNSWFlat) and graph.hnsw.efSearch == 16
    for r in search_images(b, image_paths(root), k=2).results:
        assert root / r.hits[0].path == Path(r.query)


def test_auto_index_resolves_by_rows_and_takes_no_index_args(monkeypatch):
    from mltrain.config import ExportConfig
    from mltrain.retrieval.export import check_export_index, resolve_index

    assert resolve_index("auto", {}, 499_999) == "hnsw"
    assert resolve_index("auto", {}, 500_000) == "ivf_hnsw"
    assert resolve_index("ivf_flat", {"nlist": 4}, 10) == "ivf_flat"  # a named kind stays
    assert ExportConfig().index == "auto"
    with pytest.raises(ConfigError, match=r"^export.index_args need a named export.index "
                       r"\(auto picks hnsw or ivf_hnsw by gallery size\)$"):  # fmt: skip
        check_export_index(ExportConfig(index_args={"M": 16}), 100, 16, "cosine")
    monkeypatch.setattr(export_mod, "AUTO_IVF_HNSW_ROWS", 10)
    with pytest.raises(ConfigError, match=r"^export.index auto \(ivf_hnsw\) for 20 images: "
                       r"pca_dim=32 "):  # fmt: skip
        check_export_index(ExportConfig(pca_dim=32), 20, 16, "cosine")


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_load_refuses_a_tampered_or_missing_shard(sharded_dir, how):
    path = sharded_dir / SHARDS[2]
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[:-512]))
    else:
        path.unlink()
    match = "is missing" if how == "delete" else "does not match its sha256"
    with pytest.raises(BundleError, match=rf"embeddings-00002\.npy.*{match}") as e:
        load_bundle(sharded_dir)
    assert "re-export" in str(e.value)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["shards"][0].update(name="../embeddings-00000.npy"), "not a shard file name"),
        (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
        (lambda m: m["shards"][0].update(rows=3), "shards hold 14 rows but its count is 15"),
        (lambda m: (m["shards"][0].update(rows=5), m["shards"][1].update(rows=3)),
         r"embeddings-00000\.npy has shape \(4, 512\) but manifest\.json says \(5, 512\)"),
        (lambda m: m.pop("shards"), "lists its embedding shards"),
    ],
)  # fmt: skip
def test_load_refuses_an_inconsistent_shard_list(sharded_dir, edit, match):
    edit_manifest(sharded_dir, edit)
    with pytest.raises(BundleError, match=match):
        load_bundle(sharded_dir)


def test_add_images_to_a_sharded_bundle_appends_a_shard(sharded_dir, tmp_path):
    new = write_new_class(tmp_path / "new", "zebra", 2)
    assert add_images(sharded_dir, new) == 2
    b = load_bundle(sharded_dir)
    n = CLASSES * PER_CLASS
    assert len(b) == n + 2 and b.index.ntotal == n + 2 and b.embeddings.shape[0] == n + 2
    names = [s["name"] for s in b.manifest["shards"]]
    assert names == [*SHARDS, "embeddings-00004.npy"] and b.manifest["shards"][-1]["rows"] == 2
    assert sorted(p.name for p in sharded_dir.glob("embeddings*")) == names
    hit = search_images(b, [new / "zebra" / "new_1.png"], k=1).results[0].hits[0]
    assert hit.row == n + 1 and hit.cls == "zebra" and hit.score == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(b.embeddings[n + 1], bundle_embedder(b).embed(
        [new / "zebra" / "new_1.png"])[0], atol=1e-4)  # fmt: skip
    assert not [p for p in sharded_dir.parent.iterdir() if p.name.startswith(".b.")]


def test_a_bundle_from_a_gpu_machine_embeds_on_this_one(served_bundle, tmp_path):
    """Bundles travel: one exported where `train.device: cuda` and 7 loader workers were set
    takes this machine's defaults for both, and embeds here."""
    root, bundle = served_bundle
    moved = tmp_path / "b"
    shutil.copytree(bundle, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["config"]["train"]["device"] = "cuda"
    manifest["config"]["data"]["num_workers"] = 7
    (moved / "manifest.json").write_text(json.dumps(manifest))
    embedder = bundle_embedder(load_bundle(moved, root), "torch")
    assert (embedder.cfg.train.device, embedder.cfg.data.num_workers) == ("auto", None)
    assert embedder.embed(gallery(root)[:1]).shape[0] == 1


def test_export_refuses_to_drop_images_enrolled_since(served_bundle, tmp_path):
    """Exporting over a bundle would replace it whole, silently dropping what `mltrain add` had
    enrolled; it is refused. Over a bundle without additions it still replaces."""
    root, bundle = served_bundle
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    export_bundle(tiny_embedder(root, k=4), copy, "re-export")  # nothing added: replaced
    new = tmp_path / "new" / "pink"
    new.mkdir(parents=True)
    Image.new("RGB", (40, 40), (255, 0, 255)).save(new / "p.png")
    assert add_images(copy, new.parent) == 1
    before = (copy / "metadata.csv").read_text()
    with pytest.raises(BundleError) as info:
        export_bundle(tiny_embedder(root, k=4), copy, "again")
    assert str(info.value) == (
        f"{copy} holds 1 image enrolled with `mltrain add` since its export; exporting over "
        "it would drop them: choose another folder, or remove the bundle first to start over"
    )
    assert (copy / "metadata.csv").read_text() == before
    Image.new("RGB", (40, 40), (0, 255, 255)).save(new / "c.png")
    assert add_images(copy, [new / "c.png"], "cyan") == 1  # add itself still replaces it


def test_export_refuses_to_delete_a_users_files_in_the_bundle_folder(
    served_bundle, tmp_path, capsys
):
    """A user's MYNOTES.md in the bundle folder must not be deleted by a re-export without a
    word. A bundle's own files (shards, model.onnx, images/) are replaced as before."""
    root, bundle = served_bundle
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "embeddings-00001.npy").write_bytes(b"")  # a shard name: the bundle's own
    (copy / "images").mkdir(exist_ok=True)
    (copy / "model.onnx").write_bytes(b"")  # an --onnx export's graph: replaced, with a note
    export_bundle(tiny_embedder(root, k=4), copy, "re-export")
    assert not (copy / "model.onnx").exists()
    assert (f"note: the bundle at {copy} has a model.onnx that this export (without --onnx) "
            "does not write again") in capsys.readouterr().err
    (copy / "MYNOTES.md").write_text("keep me\n")
    with pytest.raises(BundleError) as info:
        export_bundle(tiny_embedder(root, k=4), copy, "again")
    assert str(info.value) == (
        f"{copy} holds files that are no part of a bundle (MYNOTES.md); exporting over it "
        "would delete them: move them out, or choose another folder"
    )
    assert (copy / "MYNOTES.md").read_text() == "keep me\n"


def test_an_add_that_ends_while_export_embeds_is_not_dropped(served_bundle, tmp_path, monkeypatch):
    """The first check runs before the bundle's lock is taken: an `add` finishing between it
    and the lock must still stop the export (checked again under the lock)."""
    root, bundle = served_bundle
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    new = tmp_path / "new" / "pink"
    new.mkdir(parents=True)
    Image.new("RGB", (40, 40), (255, 0, 255)).save(new / "p.png")
    real_check = export_mod.check_export_index

    def add_meanwhile(*args, **kwargs):  # runs after the first target check, before the lock
        assert add_images(copy, new.parent) == 1
        return real_check(*args, **kwargs)

    monkeypatch.setattr(export_mod, "check_export_index", add_meanwhile)
    with pytest.raises(BundleError, match="holds 1 image enrolled with `mltrain add`"):
        export_bundle(tiny_embedder(root, k=4), copy, "racing")
    assert len(load_bundle(copy)) == len(load_bundle(bundle)) + 1


def test_a_training_run_given_as_a_bundle_is_named_for_what_it_is(tmp_path):
    """A run folder passed to `search` and `serve` is named as a training run, not answered
    'is not a complete bundle; re-export the bundle', since nothing was ever exported."""
    run = tmp_path / "exp" / "triplet" / "20261129-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: triplet\n")
    with pytest.raises(BundleError) as info:
        load_bundle(run)
    assert str(info.value) == (f"{run} is a training run, not a search bundle; export one "
                               f"first: python -m mltrain export --checkpoint {run} --out BUNDLE")


def test_a_checkpoint_or_an_image_folder_given_as_a_bundle_is_named_for_what_it_is(tmp_path):
    """`best.pt` or a folder of images passed where a bundle goes: told to export one, not to
    re-export a bundle that never was."""
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"\0")
    with pytest.raises(BundleError) as info:
        load_bundle(ckpt)
    assert str(info.value) == (f"{ckpt} is a checkpoint, not a search bundle; export one "
                               f"first: python -m mltrain export --checkpoint {ckpt} --out BUNDLE")
    images = write_image_folder(tmp_path / "images", 2, 2)
    with pytest.raises(BundleError) as info:
        load_bundle(images)
    assert str(info.value) == (f"{images} holds no search bundle (no manifest.json); export one "
                               "first: python -m mltrain export --checkpoint "
                               "RUN/checkpoints/best.pt --out BUNDLE")
