"""The serving core without HTTP: uploads decode and embed as files do, answers equal the
command line's, the micro-batcher batches, and thumbnails are reached by row id alone."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from mltrain.data.images import ImageTooLarge, decode_image_bytes, load_image
from mltrain.data.pipeline import decode_size
from mltrain.errors import BundleError, ConfigError, DataError, MltrainError
from mltrain.retrieval.bundle_model import bundle_embedder
from mltrain.retrieval.search import search_images
from mltrain.retrieval.service import MicroBatcher, NotFound, SearchService, UploadTooLarge
from mltrain.retrieval.verify import verify_pair
from tests.conftest import gallery, png_claiming

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def service(served_bundle):
    svc = SearchService(served_bundle[1], batch_wait_ms=30, max_upload_bytes=100_000)
    yield svc
    svc.close()


def test_bytes_decode_like_files(served_bundle):
    for path in gallery(served_bundle[0])[:2]:  # one JPEG, one PNG
        for hint in (None, 16):
            got = decode_image_bytes(path.read_bytes(), path.name, size_hint=hint)
            np.testing.assert_array_equal(got, load_image(path, hint))


def test_bad_bytes_are_one_data_error_naming_the_upload():
    with pytest.raises(DataError, match="upload.txt is not a readable image"):
        decode_image_bytes(b"hello, not an image", "upload.txt")
    with pytest.raises(DataError, match="photo is empty"):
        decode_image_bytes(b"", "photo")
    with pytest.raises(ImageTooLarge, match="bomb.png is 9000x9000 = 81.0 MP, over the 40 MP"):
        decode_image_bytes(png_claiming(9000, 9000), "bomb.png", max_pixels=40_000_000)
    with pytest.raises(ImageTooLarge, match="decompression bomb"):  # past Pillow's own limit
        decode_image_bytes(png_claiming(30000, 30000), "huge.png", max_pixels=10**10)


def test_embed_arrays_equals_embed_of_the_files(served_bundle):
    from mltrain.retrieval.bundle import load_bundle

    embedder = bundle_embedder(load_bundle(served_bundle[1]))
    paths = gallery(served_bundle[0])[:4]
    hint = decode_size(embedder.dcfg)
    arrays = [decode_image_bytes(p.read_bytes(), p.name, size_hint=hint) for p in paths]
    a, b = embedder.embed_arrays(arrays), embedder.embed(paths)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert a.shape == b.shape and cos.min() >= 0.9999


def test_search_answers_as_the_command_line_does(service, served_bundle):
    root = served_bundle[0]
    paths = gallery(root)[::3]
    cli = search_images(service.bundle, paths, 4, "none")
    for path, expected in zip(paths, cli.results, strict=True):
        doc = service.search(path.read_bytes(), k=4, rerank="none", threshold="none")
        got = doc["results"]
        assert [h["path"] for h in got] == [h.path for h in expected.hits]
        assert [h["id"] for h in got] == [h.row for h in expected.hits]
        np.testing.assert_allclose([h["score"] for h in got], [h.score for h in expected.hits],
                                   atol=1e-5)  # fmt: skip
        assert got[0]["path"] == path.relative_to(root).as_posix()  # itself first
        assert got[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert got[0]["thumb"] == f"/thumb/{got[0]['id']}" and "match" not in got[0]
        assert doc["k"] == 4 and "threshold" not in doc


def test_calibrated_threshold_marks_every_hit(service, served_bundle):
    assert service.calibrated is not None  # the fixture's export calibrated one
    path = gallery(served_bundle[0])[5]
    doc = service.search(path.read_bytes())  # default: the bundle's own threshold
    assert doc["threshold"] == service.calibrated
    assert [h["match"] for h in doc["results"]] == [
        h["score"] >= service.calibrated for h in doc["results"]]
    assert doc["answer"] == doc["results"][0]["class"]  # itself, score 1: a match
    grey = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey, format="PNG")
    doc = service.search(grey.getvalue(), threshold="1")  # only the same image reaches 1
    assert not any(h["match"] for h in doc["results"]) and doc["answer"] == "unknown"


def test_answers_say_whether_the_calibrated_threshold_is_resolved(service, served_bundle):
    """The fixture's held-out rows give 24 impostor pairs: too few for FAR 1e-3, and every
    answer that uses that threshold says so; a threshold the client chose carries no flag."""
    row = next(r for r in service.bundle.manifest["verification"]["thresholds"]
               if r["far"] == 1e-3)  # fmt: skip
    assert row["resolved"] is False and row["impostor_pairs"] < 1000
    image = gallery(served_bundle[0])[3].read_bytes()
    for threshold in (None, "auto"):
        doc = service.search(image, threshold=threshold)
        assert doc["threshold"] == row["threshold"] and doc["threshold_resolved"] is False
    assert "threshold_resolved" not in service.search(image, threshold="0.5")
    assert "threshold_resolved" not in service.search(image, threshold="none")
    assert service.verify(image, image)["threshold_resolved"] is False
    assert service.health()["threshold_resolved"] is False


@pytest.mark.parametrize("text, words", [
    ("2", "threshold 2 is outside [-1, 1], the range of a cosine similarity"),
    ("-5", "threshold -5 is outside [-1, 1]"),
    ("nan", "threshold: expected auto, none or a finite number, got 'nan'"),
])  # fmt: skip
def test_bad_threshold_names_the_request_parameter(service, served_bundle, text, words):
    image = gallery(served_bundle[0])[0].read_bytes()
    with pytest.raises(ConfigError) as e:
        service.search(image, threshold=text)
    assert str(e.value).startswith(words) and "--threshold" not in str(e.value)


def test_verify_agrees_with_verify_pair(service, served_bundle):
    a, b = gallery(served_bundle[0])[0], gallery(served_bundle[0])[-1]
    expected = verify_pair(service.bundle, a, b)
    got = service.verify(a.read_bytes(), b.read_bytes())
    assert got["score"] == pytest.approx(expected["similarity"], abs=1e-5)
    assert got["threshold"] == expected["threshold"] and got["same"] == expected["same"]
    same = service.verify(a.read_bytes(), a.read_bytes())
    assert same["same"] and same["score"] == pytest.approx(1.0, abs=1e-4)
    # `far` picks another calibrated threshold, as `verify --far` does (?far=1e-4 must not be
    # answered at 1e-3 without a word)
    loose = service.verify(a.read_bytes(), b.read_bytes(), "0.1")
    assert loose["far"] == 0.1
    assert loose["threshold"] == verify_pair(service.bundle, a, b, far=0.1)["threshold"]
    with pytest.raises(ConfigError, match=r"^far 0.5: the bundle is calibrated at FAR 0.1, "):
        service.verify(a.read_bytes(), b.read_bytes(), "0.5")
    with pytest.raises(ConfigError, match=r"^far must be a number such as 1e-3, got 'x'$"):
        service.verify(a.read_bytes(), b.read_bytes(), "x")


def test_upload_limits(service):
    with pytest.raises(UploadTooLarge) as info:  # a 25 MB file read one byte past a 20 MB
        service.search(b"\0" * 100_001)        # limit was called "20.0 MB": no size is quoted
    assert str(info.value) == "image is over the 0.0953674 MB upload limit; send a smaller image"
    small = SearchService(service.bundle, max_pixels=2000)
    try:
        with pytest.raises(ImageTooLarge, match="64x64 = 0.0041 MP, over the 0.002 MP limit"):
            small.search(next(service.bundle.root.rglob("*.png")).read_bytes())
    finally:
        small.close()
    # below what the model reads (its 34 px resize) every upload would be refused: said at start
    with pytest.raises(ConfigError) as info:
        SearchService(service.bundle, max_pixels=1000)
    assert str(info.value) == ("--max-pixels 1000 is below what the model reads (34x34 = "
                               "0.00116 MP), so every upload would be refused; raise it")


def test_concurrent_searches_are_batched_and_equal_sequential_ones(service, served_bundle):
    paths = gallery(served_bundle[0])[:8]
    sequential = [service.search(p.read_bytes(), k=3)["results"] for p in paths]
    before = sum(n for size, n in service.batcher.sizes.items() if size > 1)
    barrier, out = threading.Barrier(len(paths)), [None] * len(paths)

    def one(i: int) -> None:
        barrier.wait()
        out[i] = service.search(paths[i].read_bytes(), k=3)["results"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, conc in zip(sequential, out, strict=True):
        assert [h["path"] for h in conc] == [h["path"] for h in seq]
        np.testing.assert_allclose([h["score"] for h in conc], [h["score"] for h in seq],
                                   atol=1e-5)  # fmt: skip
    assert sum(n for size, n in service.batcher.sizes.items() if size > 1) > before


def test_batcher_fails_only_the_bad_item():
    started = threading.Event()

    def fn(items: list) -> np.ndarray:
        started.set()
        time.sleep(0.05)  # the others queue up meanwhile
        if "bad" in items:
            raise DataError("bad item")
        if "bug" in items:  # not a user error (e.g. OpenCV's own): still fails alone
            raise RuntimeError("bug item")
        return np.array([[len(s)] for s in items], dtype=np.float32)

    batcher = MicroBatcher(fn, max_batch=8, wait_s=0.05)
    try:
        first = batcher.submit("x")
        started.wait(5)
        futures = [batcher.submit(s) for s in ("ab", "bad", "abcd", "bug")]
        assert first.result(5)[0] == 1
        assert futures[0].result(5)[0] == 2 and futures[2].result(5)[0] == 4
        with pytest.raises(DataError, match="bad item"):
            futures[1].result(5)
        with pytest.raises(RuntimeError, match="bug item"):
            futures[3].result(5)
        assert batcher.sizes[4] == 1  # the four waiting ones went in together first
    finally:
        batcher.close()
    with pytest.raises(MltrainError, match="has stopped"):  # not a future that never ends
        batcher.submit("late")


def test_thumbnails_by_row_id_only(service):
    jpeg = service.thumbnail("0")
    assert jpeg[:3] == b"\xff\xd8\xff"
    for bad in ("-1", "../../etc/passwd", "1e3", "0x1", str(len(service.bundle)),
                "99999999999999999999", "１"):  # a full-width digit is no row number either
        with pytest.raises(NotFound):
            service.thumbnail(bad)


def test_health_describes_the_bundle(service):
    h = service.health()
    assert (h["images"], h["classes"], h["model"]) == (16, 4, "test_efficientnet")
    assert h["dim"] == service.bundle.manifest["embedding_dim"] and h["status"] == "ok"


def test_verify_needs_a_calibrated_bundle(service, served_bundle, tmp_path):
    from mltrain.commands.serve import status_of

    copy = tmp_path / "b"
    shutil.copytree(served_bundle[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["verification"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    plain = SearchService(copy, embedder_factory=lambda b: service.embedder)
    try:
        image = gallery(served_bundle[0])[0].read_bytes()
        assert plain.calibrated is None
        assert "match" not in plain.search(image)["results"][0]  # no threshold by default
        with pytest.raises(BundleError, match="holds no calibrated threshold") as e:
            plain.verify(image, image)
        assert status_of(e.value) == 409
    finally:
        plain.close()


def test_a_thumbnail_outside_the_image_root_names_no_server_path(service, served_bundle,
                                                                 tmp_path):  # fmt: skip
    """A row whose image resolves outside the root (a symlink to /etc/passwd) is refused,
    and the refusal names only the row id the request sent."""
    from mltrain.commands.serve import status_of

    root = tmp_path / "root"
    shutil.copytree(served_bundle[0], root)
    row = 3
    victim = root / service.bundle.metadata[row]["path"]
    victim.unlink()
    victim.symlink_to("/etc/passwd")
    other = SearchService(served_bundle[1], root, embedder_factory=lambda b: service.embedder)
    try:
        with pytest.raises(BundleError) as e:
            other.thumbnail(str(row))
        assert str(e.value) == (f"the image of row {row} lies outside the bundle's image root; "
                                "refusing to send it")  # fmt: skip
        assert status_of(e.value) == 409 and "/" not in str(e.value)
        assert other.thumbnail("0")[:3] == b"\xff\xd8\xff"
    finally:
        other.close()


@pytest.mark.parametrize("far", ["nan", "inf", "-1", "0", "1"])
def test_far_outside_0_1_is_a_400_naming_it(service, served_bundle, far):
    from mltrain.commands.serve import status_of

    image = gallery(served_bundle[0])[0].read_bytes()
    with pytest.raises(ConfigError, match=r"^far .* is not a finite number in \(0, 1\)") as e:
        service.verify(image, image, far)
    assert status_of(e.value) == 400
