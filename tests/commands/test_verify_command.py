"""`mltrain verify` as a user runs it: a mistyped path or a folder is its own one line
before the bundle is read, and an approximate threshold is said so."""

from __future__ import annotations

import pytest

import mltrain.retrieval.bundle as bundle_mod
from mltrain.__main__ import main
from tests.conftest import gallery

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def verify(*args: str) -> int:
    try:
        return main(["verify", *args])
    except SystemExit as e:
        return e.code


def test_missing_image_or_folder_is_one_line_before_the_bundle_loads(
    served_bundle, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(bundle_mod, "load_bundle",
                        lambda *a: pytest.fail("the bundle was read for a missing image"))
    good = str(gallery(served_bundle[0])[0])
    missing = tmp_path / "q.png"
    assert verify(str(served_bundle[1]), good, str(missing)) == 2
    assert capsys.readouterr().err == f"error: image {missing} does not exist; check the path\n"
    assert verify(str(served_bundle[1]), str(tmp_path), good) == 2
    assert capsys.readouterr().err == f"error: image {tmp_path} is a folder; pass image files\n"


def test_an_approximate_threshold_gets_a_note(served_bundle, capsys):
    a, b = (str(p) for p in gallery(served_bundle[0])[:2])
    assert verify(str(served_bundle[1]), a, b) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{a} vs {b}: similarity ")
    assert ("note: threshold for FAR 0.001 rests on only 24 impostor pairs (needs >= 1,000 "
            "to resolve it) and the held-out images of only 4 classes; treat it as approximate"
            ) in captured.err.splitlines()  # fmt: skip
    assert verify(str(served_bundle[1]), a, b, "--far", "0.1") == 0  # 24 pairs resolve 1e-1
    assert ("note: threshold for FAR 0.1 rests on the held-out images of only 4 classes; treat "
            "it as approximate") in capsys.readouterr().err.splitlines()  # but 4 classes do not


@pytest.mark.parametrize("far", ["nan", "inf", "0", "1", "-1e-3"])
def test_far_must_be_a_finite_rate_between_0_and_1(served_bundle, capsys, monkeypatch, far):
    monkeypatch.setattr(bundle_mod, "load_bundle",
                        lambda *a: pytest.fail("the bundle was read for a bad --far"))
    image = str(gallery(served_bundle[0])[0])
    assert verify(str(served_bundle[1]), image, image, f"--far={far}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --far {float(far):g} is not a finite number in (0, 1)")
    assert err.count("\n") == 1
