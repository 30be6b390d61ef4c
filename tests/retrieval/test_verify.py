"""Stored verification thresholds: whether their FAR is resolved, and the note that says so."""

from __future__ import annotations

import re

import pytest

from mltrain.errors import DataError
from mltrain.retrieval.bundle import load_bundle
from mltrain.retrieval.verify import calibration_note, is_resolved, verify_pair
from tests.conftest import gallery

ROW = {"threshold": 0.7, "far": 1e-4, "impostor_pairs": 594, "genuine_pairs": 40}


def test_note_for_a_far_the_pairs_cannot_resolve():
    assert calibration_note({**ROW, "resolved": False}) == (
        "threshold for FAR 0.0001 rests on only 594 impostor pairs (needs >= 10,000 to "
        "resolve it); treat it as approximate")
    assert calibration_note({**ROW, "far": 1e-3, "impostor_pairs": 48, "resolved": False}) == (
        "threshold for FAR 0.001 rests on only 48 impostor pairs (needs >= 1,000 to resolve "
        "it); treat it as approximate")
    assert calibration_note({**ROW, "resolved": True}) is None


def test_note_for_a_threshold_calibrated_on_few_classes():
    """A class_disjoint bundle holding out 2 classes has a threshold that can mark hits of four
    classes 'match': the note names the class count, not only the 144 impostor pairs."""
    resolved = {**ROW, "resolved": True}
    assert calibration_note({**resolved, "classes": 2}) == (
        "threshold for FAR 0.0001 rests on the held-out images of only 2 classes; treat it as "
        "approximate")
    assert calibration_note({**ROW, "resolved": False, "classes": 4}) == (
        "threshold for FAR 0.0001 rests on only 594 impostor pairs (needs >= 10,000 to "
        "resolve it) and the held-out images of only 4 classes; treat it as approximate")
    assert calibration_note({**resolved, "classes": 3, "rows": "all"}) == (
        "threshold for FAR 0.0001 rests on the images of only 3 classes; treat it as "
        "approximate")  # data.split none calibrates on every row
    assert calibration_note({**resolved, "classes": 5}) is None
    assert calibration_note({**resolved, "classes": True}) is None  # tampered: quiet
    assert calibration_note(resolved) is None  # bundles from before the count


def test_bundles_without_the_flag_are_judged_from_their_counts():
    assert is_resolved(ROW) is False  # 594 * 1e-4 < 1
    assert is_resolved({**ROW, "impostor_pairs": 10_000}) is True
    assert calibration_note(ROW) is not None
    assert is_resolved({"threshold": 0.5}) and calibration_note({"threshold": 0.5}) is None
    assert calibration_note({**ROW, "far": 0.0, "resolved": False}) is None  # tampered: quiet


def test_verify_pair_refuses_a_missing_image_before_building_the_model(served_bundle, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    import mltrain.retrieval.bundle_model as bundle_model

    bundle = load_bundle(served_bundle[1])
    monkeypatch.setattr(bundle_model, "bundle_embedder", lambda *a: pytest.fail("model built"))
    good = gallery(served_bundle[0])[0]
    missing = re.escape(str(tmp_path / "b.png"))
    with pytest.raises(DataError, match=rf"^image {missing} does not exist; check the path$"):
        verify_pair(bundle, good, tmp_path / "b.png")
    folder = re.escape(str(tmp_path))
    with pytest.raises(DataError, match=rf"^image {folder} is a folder; pass image files$"):
        verify_pair(bundle, tmp_path, good)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(DataError, match=r"^cannot read image .*notes\.txt .*; pass an image file"):
        verify_pair(bundle, good, notes)  # a query's advice, not a data set's


def test_a_pca_bundle_scores_hits_on_the_verify_and_threshold_scale(tmp_path):
    """The index ranks in PCA space, where cosines run lower; the hits' scores are the
    full-length cosines that verify reports and the threshold was calibrated on."""
    import numpy as np

    from mltrain.retrieval.export import export_bundle
    from mltrain.retrieval.index import prepare
    from mltrain.retrieval.search import search_images
    from tests.conftest import tiny_embedder, write_shapes_gallery

    root = write_shapes_gallery(tmp_path / "data")
    bundle = load_bundle(export_bundle(tiny_embedder(root), tmp_path / "b", "pca", "flat", 8))
    images = gallery(root)
    a, b = images[0], images[5]
    hits = search_images(bundle, [a], k=len(images)).results[0].hits
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    hit_b = next(h for h in hits if root / h.path == b)
    verified = verify_pair(bundle, a, b)["similarity"]
    assert hit_b.score == pytest.approx(verified, abs=1e-4)
    # what the PCA index alone scores the pair: not on the same scale
    rows = [i for i, m in enumerate(bundle.metadata) if root / m["path"] in (a, b)]
    x = prepare(np.asarray(bundle.embeddings[rows], dtype=np.float32), "cosine")
    raw, found = bundle.index.search(x[:1], len(images))
    raw_b = float(raw[0][list(found[0]).index(rows[1])])
    assert abs(raw_b - verified) > 0.01


def test_a_pca_bundle_searches_deeper_so_re_scoring_can_recover_neighbours(tmp_path):
    from mltrain.retrieval.export import export_bundle
    from mltrain.retrieval.search import search_depth
    from tests.conftest import tiny_embedder, write_shapes_gallery

    root = write_shapes_gallery(tmp_path / "data", per_class=16)  # 64 images
    flat = load_bundle(export_bundle(tiny_embedder(root), tmp_path / "flat", "flat"))
    pca = load_bundle(export_bundle(tiny_embedder(root), tmp_path / "pca", "pca", "flat", 8))
    assert search_depth(flat, 3, "none") == 3
    assert search_depth(pca, 3, "none") == 50  # max(4k, 50) candidates, scored at full length
    assert search_depth(pca, 20, "none") == 64  # never past the gallery


def test_only_the_test_side_calibrates_never_the_validation_classes():
    """Validation classes chose best.pt and its whitening: pairs of theirs score too well, and a
    threshold set on them would promise a FAR the test classes miss."""
    from types import SimpleNamespace

    import numpy as np

    from mltrain.retrieval.export import _splits_of
    from mltrain.retrieval.verify import calibration_rows

    split = SimpleNamespace(kind="class_disjoint", train=np.array([0, 1]), val=np.array([2, 3]),
                            heldout=np.array([4, 5]))  # 6, 7: copies evaluation left out
    splits = _splits_of(SimpleNamespace(folder=range(8), split=split))
    assert splits == ["train", "train", "val", "val", "heldout", "heldout", "copy", "copy"]
    rows, source = calibration_rows(splits)
    assert rows.tolist() == [4, 5] and source == "heldout"
    none = SimpleNamespace(kind="none", train=np.arange(3), val=np.zeros(0, int), heldout=None)
    assert calibration_rows(_splits_of(SimpleNamespace(folder=range(3), split=none)))[1] == "all"
