"""The Milvus gallery (Milvus Lite inside the bundle) answers search, verify, add and serve
with the same rows as a flat Faiss bundle of the same model and images."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from mltrain.errors import ConfigError, MltrainError  # noqa: E402
from mltrain.retrieval.add import add_images  # noqa: E402
from mltrain.retrieval.bundle import load_bundle  # noqa: E402
from mltrain.retrieval.export import check_export_index, export_bundle  # noqa: E402
from mltrain.retrieval.index import prepare  # noqa: E402
from mltrain.retrieval.search import gallery_search, search_images  # noqa: E402
from mltrain.retrieval.service import SearchService  # noqa: E402
from mltrain.retrieval.verify import verify_pair  # noqa: E402
from tests.conftest import gallery, tiny_embedder, write_image_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(image root, embedder, flat Faiss bundle, Milvus Lite bundle) of 3 classes x 5 images."""
    base = tmp_path_factory.mktemp("milvus")
    root = write_image_folder(base / "data", 3, 5, (32, 32))
    embedder = tiny_embedder(root, "resnet18", 64)
    faiss_dir = export_bundle(embedder, base / "faiss", "test", index="flat")
    milvus_dir = export_bundle(embedder, base / "milvus", "test", index="milvus")
    return root, embedder, faiss_dir, milvus_dir


def _rows(bundle, queries, k=5):
    run = search_images(bundle, queries, k, backend="torch")
    return [[h.row for h in r.hits] for r in run.results], [
        [h.score for h in r.hits] for r in run.results]  # fmt: skip


def test_the_bundle_says_milvus_and_holds_no_faiss_index(pair):
    manifest = json.loads((pair[3] / "manifest.json").read_text())
    assert manifest["index"]["backend"] == "milvus"
    assert manifest["index"]["uri"] == "gallery.db" and manifest["index"]["ntotal"] == 15
    assert (pair[3] / "gallery.db").is_dir() and not (pair[3] / "index.faiss").exists()
    assert "index.faiss" not in manifest["files"]


def test_search_and_verify_answer_alike(pair):
    root, _, faiss_dir, milvus_dir = pair
    queries = gallery(root)[::4]
    fb, mb = load_bundle(faiss_dir), load_bundle(milvus_dir)
    try:
        (f_rows, f_scores), (m_rows, m_scores) = _rows(fb, queries), _rows(mb, queries)
        assert f_rows == m_rows
        np.testing.assert_allclose(f_scores, m_scores, atol=1e-4)
        a, c = gallery(root)[0], gallery(root)[-1]
        assert verify_pair(fb, a, c) == verify_pair(mb, a, c)
    finally:
        mb.gallery.close()


def test_a_class_filter_keeps_only_that_class_through_either_backend(pair):
    _, _, faiss_dir, milvus_dir = pair
    fb, mb = load_bundle(faiss_dir), load_bundle(milvus_dir)
    try:
        q = prepare(np.asarray(fb.embeddings[:2], np.float32), "cosine")
        f_scores, f_rows = gallery_search(fb, q, 5, label=2)
        m_scores, m_rows = gallery_search(mb, q, 5, label=2)
        np.testing.assert_array_equal(f_rows, m_rows)
        assert all(fb.metadata[r]["label"] == 2 for r in f_rows.ravel())
    finally:
        mb.gallery.close()


def test_search_command_and_service_filter_by_class_through_either_backend(pair, capsys):
    from mltrain.commands.search import main as search_main

    root, _, faiss_dir, milvus_dir = pair
    query = gallery(root)[0]  # of class_0; only class_2 hits are asked for
    answers = []
    for d in (faiss_dir, milvus_dir):
        assert search_main([str(d), str(query), "-k", "3", "--class", "class_2", "--json",
                            "--backend", "torch"]) == 0  # fmt: skip
        hits = json.loads(capsys.readouterr().out)["queries"][0]["results"]
        service = SearchService(d, embedder_factory=lambda b: _torch(b))
        try:
            doc = service.search(query.read_bytes(), k=3, threshold="none", class_name="class_2")
        finally:
            service.close()
        assert [h["class"] for h in hits] == ["class_2"] * 3
        assert [h["id"] for h in doc["results"]] == [h["row"] for h in hits]
        answers.append([h["row"] for h in hits])
    assert answers[0] == answers[1]
    with pytest.raises(ConfigError, match="no class of this bundle"):
        search_main([str(faiss_dir), str(query), "--class", "nobody"])


def test_add_and_serve_answer_alike(pair, tmp_path):
    root, _, faiss_dir, milvus_dir = pair
    # the fourth class's colour: unlike every image of the bundle (no tied scores)
    new = write_image_folder(tmp_path / "new", ["x", "y", "z", "class_new"], 3, (32, 32))
    new = new / "class_new"
    dirs = [shutil.copytree(d, tmp_path / d.name) for d in (faiss_dir, milvus_dir)]
    assert [add_images(d, new) for d in dirs] == [3, 3]
    answers = []
    for d in dirs:
        service = SearchService(d, embedder_factory=lambda b: _torch(b))
        try:
            assert len(service.bundle) == 18
            doc = service.search(gallery(new)[0].read_bytes(), k=4, threshold="none")
            answers.append([(h["id"], h["class"]) for h in doc["results"]])
        finally:
            service.close()
    assert answers[0] == answers[1] and answers[0][0] == (15, "class_new")


def _torch(bundle):
    from mltrain.retrieval.bundle_model import bundle_embedder

    return bundle_embedder(bundle, "torch")


def test_a_collection_of_another_length_is_one_line_and_the_bundle_stays(pair, tmp_path):
    _, embedder, _, milvus_dir = pair
    from pymilvus import MilvusClient

    from mltrain.retrieval.milvus import _create, _release_lite

    db = tmp_path / "shared.db"
    client = MilvusClient(str(db))
    _create(client, "other", 8, "cosine", "FLAT")
    client.close()
    _release_lite(db)
    target = tmp_path / "b"
    shutil.copytree(milvus_dir, target)
    before = (target / "manifest.json").read_text()
    exp = embedder.cfg.export
    old = exp.index, exp.index_args
    exp.index, exp.index_args = "milvus", {"uri": str(db), "collection": "other"}
    try:
        with pytest.raises(ConfigError, match=r"collection other at .*shared.db holds 8-d"):
            check_export_index(exp, 15, 64, "cosine")
        with pytest.raises(ConfigError, match="pca_dim applies to Faiss"):
            export_bundle(embedder, target, "test", pca_dim=4)
    finally:
        exp.index, exp.index_args = old
    assert (target / "manifest.json").read_text() == before


def test_without_pymilvus_the_error_names_the_install(pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    exp = pair[1].cfg.export
    old = exp.index
    exp.index = "milvus"
    try:
        with pytest.raises(MltrainError, match=r"pip install -e '\.\[milvus\]'"):
            check_export_index(exp, 15, 64, "cosine")
    finally:
        exp.index = old


def test_a_server_that_is_down_is_named(pair):
    exp = pair[1].cfg.export
    old = exp.index, exp.index_args
    exp.index, exp.index_args = "milvus", {"uri": "http://127.0.0.1:9"}
    try:
        with pytest.raises(MltrainError, match=r"Milvus at http://127.0.0.1:9 is unreachable"):
            check_export_index(exp, 15, 64, "cosine")
    finally:
        exp.index, exp.index_args = old


def test_the_benchmark_prints_every_backend_with_ratios(capsys):
    from benchmarks.milvus import main

    main(["--n", "2000", "--queries", "5"])
    out = capsys.readouterr().out
    for name in ("faiss ivf_flat", "faiss flat", "milvus lite FLAT", "milvus lite IVF_FLAT"):
        assert f"| {name} |" in out
    assert "| faiss ivf_flat | " in out and " | 1 | " in out


def _collections(db) -> list[str]:
    from pymilvus import MilvusClient

    from mltrain.retrieval.milvus import _release_lite

    client = MilvusClient(str(db))
    try:
        return sorted(client.list_collections())
    finally:
        client.close()
        _release_lite(db)


def test_a_gallery_outside_the_bundle_gets_a_collection_per_export(pair, tmp_path, capsys):
    """A URI outside the bundle (a server, here a shared Lite folder) works like the default,
    and a second export writes a new collection, so the bundle it replaces keeps its own
    until the swap; then the replaced one, which no bundle names any more, is dropped."""
    root, embedder, faiss_dir, _ = pair
    exp = embedder.cfg.export
    old = exp.index, exp.index_args
    db = tmp_path / "shared.db"
    exp.index, exp.index_args = "milvus", {"uri": str(db)}
    try:
        first = json.loads((export_bundle(embedder, tmp_path / "b", "t") / "manifest.json")
                           .read_text())["index"]  # fmt: skip
        b = load_bundle(tmp_path / "b")
        queries = gallery(root)[1::5]
        try:
            assert _rows(b, queries)[0] == _rows(load_bundle(faiss_dir), queries)[0]
        finally:
            b.gallery.close()
        capsys.readouterr()
        second = json.loads((export_bundle(embedder, tmp_path / "b", "t") / "manifest.json")
                            .read_text())["index"]  # fmt: skip
        b = load_bundle(tmp_path / "b")
        try:
            assert _rows(b, queries)[0] == _rows(load_bundle(faiss_dir), queries)[0]
        finally:
            b.gallery.close()
    finally:
        exp.index, exp.index_args = old
    assert not (tmp_path / "b" / "gallery.db").exists()
    assert first["collection"].startswith("mltrain_b_")
    assert second["collection"] != first["collection"]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dropped Milvus collection {first['collection']} at {db} (the replaced bundle's "
        "gallery)"]  # fmt: skip
    assert _collections(db) == [second["collection"]]


def test_a_user_named_collection_survives_a_reexport_to_another_name(pair, tmp_path, capsys):
    _, embedder, _, _ = pair
    exp = embedder.cfg.export
    old = exp.index, exp.index_args
    db = tmp_path / "shared.db"
    try:
        for name in ("kept", "next"):
            exp.index, exp.index_args = "milvus", {"uri": str(db), "collection": name}
            export_bundle(embedder, tmp_path / "b", "t")
        exp.index, exp.index_args = "milvus", {"uri": str(db)}  # a generated one, then Faiss
        export_bundle(embedder, tmp_path / "c", "t")
        generated = json.loads((tmp_path / "c" / "manifest.json").read_text())["index"]
        exp.index, exp.index_args = "flat", {}
        export_bundle(embedder, tmp_path / "c", "t")
    finally:
        exp.index, exp.index_args = old
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dropped Milvus collection {generated['collection']} at {db} (the replaced bundle's "
        "gallery)"]  # fmt: skip
    assert _collections(db) == ["kept", "next"]


def test_a_replaced_collection_is_left_with_a_note_where_the_server_is_down():
    from mltrain.retrieval.gallery import retire_replaced

    old = {"backend": "milvus", "uri": "http://127.0.0.1:9", "collection": "mltrain_b_1",
           "args": {"uri": "http://127.0.0.1:9"}}  # fmt: skip
    line = retire_replaced(old, {"kind": "flat", "ntotal": 15})
    assert line.startswith("note: the replaced bundle's Milvus collection mltrain_b_1 at "
                           "http://127.0.0.1:9 was left (")  # fmt: skip
    assert "MilvusClient('http://127.0.0.1:9').drop_collection('mltrain_b_1')" in line
    assert "\n" not in line
    # nothing to drop, nothing connected to: in the bundle, user-named, or still in use
    for other in ({"uri": "gallery.db", "collection": "gallery"},
                  {"collection": "mltrain_b_1", "args": {"collection": "mltrain_b_1"}},
                  {"collection": "mine"}):  # fmt: skip
        assert retire_replaced({**old, **other}, {"kind": "flat"}) is None
    assert retire_replaced(old, {**old, "kind": "milvus"}) is None
    assert retire_replaced(None, old) is None
