"""The search command line (`mltrain.commands.search`): tables, JSON, contact sheets, bad
queries and bad bundles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mltrain.commands.search import script as main
from mltrain.retrieval.bundle import load_bundle
from mltrain.retrieval.export import export_bundle
from mltrain.retrieval.sheet import COLOURS, PAD, THUMB
from tests.conftest import tiny_embedder, write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A flat bundle of a random resnet18 over 3 classes x 5 images of 32 px."""
    base = tmp_path_factory.mktemp("search")
    root = write_image_folder(base / "data", 3, 5, (32, 32))
    out = export_bundle(tiny_embedder(root, "resnet18", 64, k=4), base / "bundle", "test")
    return root, out


ROW = re.compile(r"^\s+(\d+)\s+(-?\d+\.\d+)\s+(\S+)\s+(\S+)$", re.M)


def test_prints_ranked_results_and_microseconds(exported, capsys):
    root, out = exported
    q1, q2 = root / "class_0" / "img_001.png", root / "class_2" / "img_004.jpg"
    assert main([str(out), str(q1), str(q2), "-k", "3"]) == 0
    stdout = capsys.readouterr().out
    rows = ROW.findall(stdout)
    assert len(rows) == 6  # 3 per query
    assert rows[0][0] == "1" and rows[0][3] == "class_0/img_001.png" and rows[0][2] == "class_0"
    assert rows[3][3] == "class_2/img_004.jpg" and float(rows[3][1]) == pytest.approx(1, abs=1e-3)
    searched = re.findall(r"index search (\d+) us\)", stdout)
    assert len(searched) == 2 and all(int(us) > 0 for us in searched)
    assert re.search(r"embedded 2 of 2 queries in \d+\.\d ms", stdout)


def test_default_k_comes_from_the_bundle(exported, capsys):
    root, out = exported
    assert main([str(out), str(root / "class_1" / "img_000.jpg")]) == 0
    assert len(ROW.findall(capsys.readouterr().out)) == 4  # export.k


def test_unreadable_query_is_reported_and_others_still_run(exported, tmp_path, capsys):
    root, out = exported
    bad = tmp_path / "broken.jpg"
    bad.write_text("this is not an image")
    good = root / "class_1" / "img_002.jpg"
    assert main([str(out), str(bad), str(good), "-k", "2"]) == 1
    captured = capsys.readouterr()
    assert f"error: query {bad}" in captured.err and "cannot read image" in captured.err
    assert "Traceback" not in captured.err
    rows = ROW.findall(captured.out)
    assert len(rows) == 2 and rows[0][3] == "class_1/img_002.jpg"
    assert "embedded 1 of 2 queries" in captured.out


def test_missing_query_file_is_an_error_line(exported, tmp_path, capsys):
    root, out = exported
    assert main([str(out), str(tmp_path / "nope.jpg")]) == 2  # nothing answered: a mistake
    assert "nope.jpg" in capsys.readouterr().err


def test_bad_bundle_exits_2_without_traceback(exported, tmp_path, capsys):
    root, out = exported
    query = str(root / "class_0" / "img_000.jpg")
    assert main([str(tmp_path / "missing"), query]) == 2
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "index.faiss").write_bytes(b"garbage")
    assert main([str(broken), query]) == 2
    err = capsys.readouterr().err
    assert "index.faiss" in err and "re-export" in err and "Traceback" not in err


def test_json_output(exported, capsys):
    root, out = exported
    q = root / "class_2" / "img_003.png"
    assert main([str(out), str(q), "-k", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (result,) = doc["queries"]
    assert result["error"] is None and result["search_us"] > 0
    assert [r["rank"] for r in result["results"]] == [1, 2]
    assert result["results"][0]["path"] == "class_2/img_003.png"
    assert result["results"][0]["class"] == "class_2"
    assert doc["metric"] == "cosine" and doc["timing"]["embed_ms"] > 0


def test_contact_sheet_outlines_matches_green_and_misses_red(exported, tmp_path, capsys):
    root, out = exported
    sheet = tmp_path / "sheet.png"
    q = root / "class_0" / "img_000.jpg"
    assert main([str(out), str(q), "-k", "15", "--sheet", str(sheet)]) == 0
    assert "contact sheet" in capsys.readouterr().out
    img = np.asarray(Image.open(sheet).convert("RGB"))
    cell_w = THUMB + 2 * PAD
    assert img.shape[1] == 16 * cell_w  # the query and all 15 images
    outline = [tuple(img[3, c * cell_w + cell_w // 2]) for c in range(16)]
    assert outline[0] == COLOURS["query"]
    assert outline[1] == COLOURS["match"]  # the image itself
    assert outline.count(COLOURS["match"]) == 5 and outline.count(COLOURS["miss"]) == 10


def test_contact_sheet_is_grey_for_an_unknown_query_class(exported, tmp_path):
    root, out = exported
    q = tmp_path / "unknown_class" / "q.png"
    q.parent.mkdir()
    q.write_bytes((root / "class_1" / "img_001.png").read_bytes())
    sheet = tmp_path / "sheet.png"
    assert main([str(out), str(q), "-k", "2", "--sheet", str(sheet)]) == 0
    img = np.asarray(Image.open(sheet).convert("RGB"))
    cell_w = THUMB + 2 * PAD
    assert tuple(img[3, cell_w + cell_w // 2]) == COLOURS["unknown"]


def test_add_flag_adds_images(exported, tmp_path, capsys):
    root, out = exported
    copy = tmp_path / "bundle"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    new = tmp_path / "new" / "pink"
    new.mkdir(parents=True)
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(new / "p.png")
    # search flags with --add would be ignored: refused, before anything is added
    assert main(["--add", str(copy), str(new.parent), "-k", "3", "--sheet", "s.png"]) == 2
    assert capsys.readouterr().err == (
        "error: -k, --sheet only apply to a search, not with --add\n"
    )
    assert len(load_bundle(copy)) == 15
    assert main(["--add", str(copy), str(new.parent), "--json"]) == 2
    assert capsys.readouterr().err == "error: --json only applies to a search, not with --add\n"
    assert main(["--add", str(copy), str(new.parent)]) == 0
    assert "added 1 image to" in capsys.readouterr().out
    assert len(load_bundle(copy)) == 16
    assert main([str(copy), str(new / "p.png"), "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)["queries"][0]["results"][0]
    assert hit["class"] == "pink" and hit["path"] == "bundle:images/pink/p.png"
    assert Path(out / "manifest.json").is_file()  # the original is untouched
    assert len(load_bundle(out)) == 15


def test_missing_query_and_folder_are_named_without_the_data_check_advice(
    exported, tmp_path, capsys, monkeypatch
):
    """A mistyped path or a folder is no unreadable image: its own one line, and no model
    is built when no query is left."""
    import mltrain.retrieval.search as search_mod

    root, out = exported
    missing = tmp_path / "q.png"

    def no_model(*a, **k):
        raise AssertionError("the model was built for queries that do not exist")

    monkeypatch.setattr(search_mod, "bundle_embedder", no_model)
    assert main([str(out), str(missing), str(root)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert f"error: query {missing}: does not exist; check the path" in lines
    assert f"error: query {root}: is a folder; pass image files" in lines
    assert "data check" not in captured.err and "replace or delete" not in captured.err
    assert "no query could be searched" in captured.out


def test_threshold_auto_notes_a_calibration_too_thin_for_its_far(exported, capsys):
    root, out = exported
    row = next(r for r in load_bundle(out).manifest["verification"]["thresholds"]
               if r["far"] == 1e-3)  # fmt: skip
    assert row["resolved"] is False  # 15 images: far fewer than 1,000 impostor pairs
    q = str(root / "class_0" / "img_000.jpg")
    classes = load_bundle(out).manifest["verification"]["classes"]
    assert classes == 3  # a class_disjoint or small folder: few classes also make it approximate
    note = (f"note: threshold for FAR 0.001 rests on only {row['impostor_pairs']} impostor "
            "pairs (needs >= 1,000 to resolve it) and the held-out images of only 3 classes; "
            "treat it as approximate")  # fmt: skip
    assert main([str(out), q, "--threshold", "auto", "--json"]) == 0
    captured = capsys.readouterr()
    assert note in captured.err.splitlines()
    doc = json.loads(captured.out)
    assert doc["threshold"] == row["threshold"] and doc["threshold_resolved"] is False
    assert main([str(out), q, "--threshold", "0.5"]) == 0  # the user's own: nothing to say
    assert "note:" not in capsys.readouterr().err


def test_image_root_that_does_not_exist_is_refused(exported, tmp_path, capsys):
    root, out = exported
    missing = tmp_path / "moved"
    assert main([str(out), str(root / "class_0" / "img_000.jpg"), "--image-root",
                 str(missing)]) == 2  # fmt: skip
    assert capsys.readouterr().err == (
        f"error: --image-root {missing} does not exist; pass the folder that holds the "
        "bundle's class folders (where its images are now)\n")


def test_a_sheet_named_other_than_png_is_refused_before_searching(exported, tmp_path, capsys):
    root, out = exported
    q = root / "class_1" / "img_001.png"
    sheet = tmp_path / "sheet.jpg"
    assert main([str(out), str(q), "--sheet", str(sheet)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --sheet {sheet}: the contact sheet is a PNG; name it sheet.png"
    )
    assert not sheet.exists()


def test_a_sheet_whose_hit_images_are_all_missing_says_where_it_looked(exported, tmp_path,
                                                                         capsys):  # fmt: skip
    root, out = exported
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sheet = tmp_path / "sheet.png"
    q = root / "class_1" / "img_001.png"
    assert main([str(out), str(q), "-k", "2", "--image-root", str(elsewhere),
                 "--sheet", str(sheet)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert (f"note: none of the 2 hit images was found under {elsewhere}; pass the folder that "
            "holds them with --image-root") in err  # fmt: skip
    assert sheet.is_file()
    assert main([str(out), str(q), "-k", "2", "--sheet", str(sheet)]) == 0
    assert "none of the" not in capsys.readouterr().err


def test_a_long_class_name_is_cut_in_the_table_only(capsys):
    """A 230-character class name must not make every row of the table 450 characters wide.
    The cut is in the middle: nested names differ at their end."""
    from types import SimpleNamespace

    from mltrain.commands.search import CLASS_COLUMN, print_table
    from mltrain.retrieval.search import Hit, QueryResult, SearchRun

    magi = "images_background/Alphabet_of_the_Magi_and_Other_Scripts/character"
    hits = [Hit(1, 0.9, 0, magi + "01", "a.png"), Hit(2, 0.8, 1, magi + "02", "b.png"),
            Hit(3, 0.7, 2, "b", "c.png")]  # fmt: skip
    run = SearchRun([QueryResult("q.png", search_us=5.0, hits=hits)], k=3, embed_ms=1.0,
                    model_ms=1.0)  # fmt: skip
    print_table(run, SimpleNamespace(metric="cosine"))
    rows = capsys.readouterr().out.splitlines()
    assert "     1    0.9000  images_backgr…_Other_Scripts/character01  a.png" in rows
    assert "     2    0.8000  images_backgr…_Other_Scripts/character02  b.png" in rows
    assert f"     3    0.7000  {'b':<{CLASS_COLUMN}}  c.png" in rows
    assert run.results[0].hits[0].cls == magi + "01"  # --json reads the hits: whole


def test_a_class_filter_and_a_short_index_answer_are_scored_exactly(exported):
    """An approximate index filtered to one class misses members (HNSW found 16 of a class's
    20), and past the part of its graph it reaches leaves slots empty: both are answered
    from the stored embeddings instead, every row of the class or gallery, best first."""
    from mltrain.retrieval.index import l2_normalize, prepare
    from mltrain.retrieval.search import gallery_search

    bundle = load_bundle(exported[1])
    emb = np.asarray(bundle.embeddings, np.float32)
    q = prepare(emb[[0, 7]], bundle.metric)
    cosines = l2_normalize(emb) @ q.T  # (rows, queries): the full-length scores
    members = [r for r, m in enumerate(bundle.metadata) if m["label"] == 1]
    assert len(members) == 5
    scores, rows = gallery_search(bundle, q, 8, label=1)
    for i in range(2):
        best = sorted(members, key=lambda r: -cosines[r, i])
        assert rows[i, :5].tolist() == best and (rows[i, 5:] == -1).all()
        np.testing.assert_allclose(scores[i, :5], cosines[best, i], atol=1e-5)

    class Short:  # an index that fills 3 slots of each answer
        dim = emb.shape[1]

        def count(self):
            return len(emb)

        def search(self, queries, k):
            rows = np.full((len(queries), k), -1, np.int64)
            rows[:, :3] = [4, 5, 6]
            return np.zeros((len(queries), k), np.float32), rows

    bundle.gallery = Short()
    scores, rows = gallery_search(bundle, q, 15)
    for i in range(2):
        np.testing.assert_array_equal(rows[i], np.argsort(-cosines[:, i], kind="stable"))
        np.testing.assert_allclose(scores[i], np.sort(cosines[:, i])[::-1], atol=1e-5)
    assert gallery_search(bundle, q, 3)[1].tolist() == [[4, 5, 6], [4, 5, 6]]  # full: as is


def test_a_short_answer_from_a_large_gallery_stays_as_the_index_gave_it(exported, monkeypatch):
    """Past EXACT_FALLBACK_BYTES one query would read gigabytes: the partial answer stands.
    The index is searched under the caller's lock, the exact scoring outside it."""
    import threading

    import mltrain.retrieval.search as search_mod

    bundle = load_bundle(exported[1])
    q = np.asarray(bundle.embeddings[:1], np.float32)
    lock, held = threading.Lock(), []

    class Short:
        dim = q.shape[1]

        def search(self, queries, k):
            held.append(lock.locked())
            rows = np.full((len(queries), k), -1, np.int64)
            rows[:, 0] = 3
            return np.zeros((len(queries), k), np.float32), rows

    bundle.gallery = Short()
    monkeypatch.setattr(search_mod, "exact_search", lambda *a: pytest.fail("scanned"))
    monkeypatch.setattr(search_mod, "EXACT_FALLBACK_BYTES", 4 * q.shape[1] * len(bundle) - 1)
    assert search_mod.gallery_search(bundle, q, 4, lock=lock)[1].tolist() == [[3, -1, -1, -1]]
    assert held == [True] and not lock.locked()


def test_the_query_class_is_the_longest_run_of_its_folders_that_names_a_class():
    from mltrain.retrieval.sheet import query_class

    nested = {"Latin/character07", "Greek/character07"}
    q = Path("/data/omniglot/Latin/character07/q.png")
    assert query_class(q, nested) == "Latin/character07"  # not "character07", nor a miss
    assert query_class(q, {"character07"}) == "character07"
    assert query_class(q, nested | {"character07"}) == "Latin/character07"
    assert query_class(Path("q.png"), nested) is None
    assert query_class(Path("/data/Korean/character07/q.png"), nested) is None


def test_help_and_a_bad_k_answer_before_the_bundle_and_model_import():
    """`search -h` and `-k 0` took 6 s importing torch, timm and Faiss before saying a word."""
    import subprocess
    import sys

    code = ("import sys; from mltrain.commands.search import main\n"
            "try:\n    main(['bundle', 'q.png', '-k', '0'])\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n"
            "print(sorted(m for m in ('torch', 'faiss', 'timm') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out == "ConfigError -k must be at least 1, got 0\n[]\n"


def test_cosine_scores_stay_within_minus_one_and_one(exported):
    """fp32 rounding lets an image's cosine with itself come out at 1.0000001: a score on the
    cosine scale is kept inside [-1, 1], as every caller reads it (search, the server, verify)."""
    from mltrain.retrieval.bundle import load_bundle
    from mltrain.retrieval.search import rank_hits
    from mltrain.retrieval.verify import pair_verdict

    bundle = load_bundle(exported[1])
    assert bundle.metric == "cosine"
    query = np.zeros(64, dtype=np.float32)  # unused: no PCA, no re-ranking
    hits = rank_hits(bundle, query, np.array([1.0000001, -1.0000001], dtype=np.float32),
                     np.array([0, 1]), 2, "none")  # fmt: skip
    assert [h.score for h in hits] == [1.0, -1.0]
    from mltrain.inference.vectors import l2_normalize

    twin = l2_normalize(np.random.default_rng(1).standard_normal((1, 1280)).astype(np.float32))
    assert np.einsum("nd,nd->n", twin, twin)[0] > 1.0  # this vector with itself, unclipped
    assert pair_verdict(np.vstack([twin, twin]), "cosine", {"threshold": 0.9})[0] == 1.0
