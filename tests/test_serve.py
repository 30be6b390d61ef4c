"""`mltrain serve`: the HTTP API through FastAPI's TestClient, bad uploads, the real server as
a subprocess (with concurrent clients) and the page in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from mltrain.commands.serve import create_app  # noqa: E402
from mltrain.retrieval.service import SearchService  # noqa: E402
from tests.conftest import gallery, png_claiming  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(served_bundle):
    service = SearchService(served_bundle[1], max_upload_bytes=200_000)
    with TestClient(create_app(service)) as c:
        yield c
    service.close()


def post_image(client, path_or_bytes, url="/search", field="image", **params):
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return client.post(url, files={field: ("q.jpg", data, "image/jpeg")}, params=params)


def test_search_finds_the_image_itself(client, served_bundle):
    root = served_bundle[0]
    for path in gallery(root)[:3]:
        r = post_image(client, path, k=3)
        assert r.status_code == 200, r.text
        doc = r.json()
        top = doc["results"][0]
        assert top["path"] == path.relative_to(root).as_posix() and top["rank"] == 1
        assert top["score"] == pytest.approx(1.0, abs=1e-4) and top["class"] == path.parent.name
        assert len(doc["results"]) == doc["k"] == 3 and doc["rerank"] == "none"
        assert top["match"] is True and "threshold" in doc  # the bundle is calibrated
        assert doc["embed_ms"] > 0 and doc["search_ms"] > 0


def test_search_parameters_as_form_fields(client, served_bundle):
    path = gallery(served_bundle[0])[4]
    r = client.post("/search", files={"image": ("q.png", path.read_bytes())},
                    data={"k": "2", "threshold": "none"})  # fmt: skip
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert "match" not in r.json()["results"][0]


def test_verify_endpoint(client, served_bundle):
    a, b = gallery(served_bundle[0])[0], gallery(served_bundle[0])[1]
    files = {"a": ("a.jpg", a.read_bytes()), "b": ("b.jpg", a.read_bytes())}
    same = client.post("/verify", files=files).json()
    assert same["same"] is True and same["score"] == pytest.approx(1.0, abs=1e-4)
    files["b"] = ("b.png", b.read_bytes())
    doc = client.post("/verify", files=files).json()
    assert set(doc) == {"score", "threshold", "same", "far", "threshold_resolved"}
    assert doc["score"] < 1.0 - 1e-6
    assert doc["same"] == (doc["score"] >= doc["threshold"])


def test_thumbnails_health_and_page(client):
    r = client.get("/thumb/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content[:2] == b"\xff\xd8"
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["images"] == 16 and h.json()["classes"] == 4
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="query"' in page.text
    assert not any(w in page.text for w in ("innerHTML", "outerHTML", "insertAdjacentHTML"))
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'rel="icon" href="data:image/svg+xml,' in page.text  # no request for an icon
    assert client.get("/favicon.ico").status_code == 204  # browsers ask anyway: no 404


BAD_THUMBS = ["/thumb/-1", "/thumb/16", "/thumb/99999999999999999999999", "/thumb/abc",
              "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/%2e%2e/%2e%2e/etc/passwd",
              "/thumb/../../etc/passwd"]  # fmt: skip


@pytest.mark.parametrize("url", BAD_THUMBS)
def test_bad_thumbnail_ids_never_reach_a_file(client, url):
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code)
    assert b"root:" not in r.content
    assert client.get("/health").status_code == 200


def test_bad_uploads_get_a_clear_4xx_and_the_server_stays_up(client, served_bundle):
    cases = [
        (b"", 400, "is empty"),
        (b"just some text, no image", 400, "is not a readable image"),
        (os.urandom(200_001), 413, "over the 0.190735 MB upload limit"),
        (png_claiming(9000, 9000), 413, "81.0 MP, over the 40 MP limit"),
        (png_claiming(30000, 30000), 413, "decompression bomb"),
        (png_claiming(100_000, 1), 413, "with its shorter side scaled to"),  # a 0.1 MP strip
    ]
    for data, status, words in cases:
        r = post_image(client, data)
        assert r.status_code == status, (words, r.text)
        assert words in r.json()["detail"] and "\n" not in r.json()["detail"]
        assert " at 0x" not in r.json()["detail"]  # no object address from inside Pillow
        assert client.get("/health").status_code == 200
    r = client.post("/search", data={"k": "3"})  # no file at all
    assert r.status_code == 400 and "multipart file field 'image'" in r.json()["detail"]
    r = post_image(client, gallery(served_bundle[0])[0], k="many")
    assert r.status_code == 400 and "k must be an integer" in r.json()["detail"]
    for bad in ("nan", "inf", "-inf", "1e999"):  # not JSON numbers: a 400, never a 500
        r = post_image(client, gallery(served_bundle[0])[0], threshold=bad)
        assert r.status_code == 400 and "finite number" in r.json()["detail"], bad
    r = post_image(client, gallery(served_bundle[0])[0], rerank="<script>")
    assert r.status_code == 400 and "rerank must be" in r.json()["detail"]
    r = client.post("/search", content=b"x" * 10, headers={"content-length": "999999999",
                                                           "content-type": "text/plain"})
    assert r.status_code == 413 and "byte limit" in r.json()["detail"]
    head = b'--x\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n\r\n'
    chunks = iter([head] + [b"\0" * 65536] * 8)  # no Content-Length: a chunked upload
    r = client.post("/search", content=chunks,
                    headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "byte limit" in r.json()["detail"]
    assert client.get("/health").status_code == 200


def test_missing_serve_extra_is_one_line(monkeypatch, served_bundle, capsys):
    import importlib.util

    from mltrain.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        main(["serve", str(served_bundle[1])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "needs uvicorn: install the serve extra: pip install -e '.[serve]'" in err
    assert "Traceback" not in err


def test_serve_backend_onnx_without_the_graph_stops_before_serving(served_bundle, capsys):
    """The served bundle was exported without --onnx: one line that says to re-export, and
    no server is started (uvicorn.run is never reached)."""
    from mltrain.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["serve", str(served_bundle[1]), "--backend", "onnx"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "has no model.onnx for --backend onnx; re-export the bundle with --onnx" in err
    assert "Traceback" not in err and err.count("\n") == 1


# --- the real server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_bundle):
    """`python -m mltrain serve BUNDLE --port P` as a subprocess; its base URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mltrain", "serve", str(served_bundle[1]), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start: {proc.stdout.read()}")
            time.sleep(0.2)
        for _ in range(50):  # it printed its URL before it began to listen
            if f"at {url}/" in proc.stdout.readline():
                break
        else:
            pytest.fail("the server did not print its URL")
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(20)


def test_real_server_answers_concurrent_clients(server, served_bundle):
    url, _ = server
    root = served_bundle[0]
    paths = gallery(root)
    with httpx.Client(base_url=url, timeout=60) as c:
        health = c.get("/health").json()
        assert health["images"] == 16 and health["dim"] > 0
        sequential = [c.post("/search", files={"image": p.read_bytes()}).json() for p in paths]
    out: list = [None] * len(paths)
    barrier = threading.Barrier(len(paths))

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            out[i] = c.post("/search", files={"image": paths[i].read_bytes()}).json()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for path, seq, conc in zip(paths, sequential, out, strict=True):
        assert conc["results"][0]["path"] == path.relative_to(root).as_posix()
        assert [h["path"] for h in conc["results"]] == [h["path"] for h in seq["results"]]
        assert [h["score"] for h in conc["results"]] == pytest.approx(
            [h["score"] for h in seq["results"]], abs=1e-5)
    batches = httpx.get(url + "/health").json()["batches"]
    assert any(int(size) > 1 for size in batches), batches


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


# Visible boxes of the page's parts, read in the browser: [left, top, width, height].
BOXES = """() => {
  const box = (q) => { const r = document.querySelector(q).getBoundingClientRect();
                       return [r.left, r.top, r.width, r.height]; };
  const badges = [...document.querySelectorAll("#results .badge")].map((b) => {
    const r = b.getBoundingClientRect();
    const line = parseFloat(getComputedStyle(b).lineHeight) || 16;
    return { text: b.textContent, height: r.height, line: line, right: r.right,
             card: b.closest(".hit").getBoundingClientRect().right };
  });
  return { search: box("#search"), verify: box("#verify"), out: box("#out"), answer: box("#answer"),
           status: box("#status"), results: box("#results"), badges: badges,
           page: document.documentElement.scrollWidth, view: window.innerWidth };
}"""


def test_page_in_headless_chromium(server, served_bundle):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium binary on PATH")
    url, _ = server
    root = served_bundle[0]
    query = gallery(root)[6]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 620})
            page.goto(url + "/")
            page.set_input_files("#query", str(query))
            page.wait_for_selector("#results .hit", timeout=30_000)
            first = page.locator("#results .hit").first
            assert first.get_attribute("data-path") == query.relative_to(root).as_posix()
            # a hit over the threshold is not called "correct": the badge says what it means
            assert first.locator(".badge").text_content() == "above threshold"
            answer = page.locator("#answer")
            assert answer.locator(".what").text_content() == "Answer"
            assert answer.locator(".cls").text_content() == query.parent.name
            page.set_input_files("#second", str(query))
            # expect() and evaluate_all, not wait_for_function: the page's CSP forbids eval
            verdict = page.locator("#verdict")
            sync_api.expect(verdict.locator(".big")).to_have_text("Same class", timeout=30_000)
            assert "same" in verdict.get_attribute("class")
            assert "1 in 1,000" in verdict.text_content()  # the default FAR
            resolved = httpx.get(url + "/health").json()["threshold_resolved"]
            approximate = "approximate" in verdict.text_content()
            assert approximate == (resolved is False)  # the page says what the answer flags
            page.select_option("#far", "0.01")  # another calibrated FAR: verified again
            sync_api.expect(verdict).to_contain_text("1 in 100)", timeout=30_000)
            images = page.locator("#results img")
            loaded = "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)"
            deadline = time.monotonic() + 30
            while not images.evaluate_all(loaded) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert images.evaluate_all(loaded), "thumbnails did not load"
            if shot := os.environ.get("MLTRAIN_SCREENSHOT"):
                page.screenshot(path=shot)
            assert "re-ranked" not in page.locator("#status").text_content()
            wide = page.evaluate(BOXES)
            assert wide["answer"][1] < wide["status"][1] < wide["results"][1]  # answer first
            assert wide["search"][0] + wide["search"][2] <= wide["out"][0]  # side by side
            assert wide["verify"][0] + wide["verify"][2] <= wide["out"][0]
            for badge in wide["badges"]:
                assert badge["height"] < 1.6 * badge["line"], badge  # one line, never wrapped
                assert badge["right"] <= badge["card"] + 0.5, badge
            page.set_viewport_size({"width": 420, "height": 900})
            narrow = page.evaluate(BOXES)
            # one column: search, its answer and results, then verify
            assert narrow["search"][1] + narrow["search"][3] <= narrow["out"][1]
            assert narrow["out"][1] + narrow["out"][3] <= narrow["verify"][1]
            assert narrow["page"] <= narrow["view"]  # nothing wider than the window
            for badge in narrow["badges"]:
                assert badge["height"] < 1.6 * badge["line"], badge
                assert badge["right"] <= badge["card"] + 0.5, badge
            page.set_viewport_size({"width": 1100, "height": 620})

            second = gallery(root)[1]
            doc = httpx.post(url + "/search", files={"image": (second.name, second.read_bytes())},
                             params={"k": 8}, timeout=60).json()  # fmt: skip
            doc["rerank"] = "alpha_qe"
            page.route("**/search*", lambda route: route.fulfill(json=doc))
            page.set_input_files("#query", str(second))
            sync_api.expect(page.locator("#status")).to_contain_text(
                "; re-ranked with alpha_qe (scores stay cosine, so not in order)", timeout=30_000)
        finally:
            browser.close()


def test_a_client_that_hangs_up_mid_body_is_one_log_line(served_bundle, caplog):
    """`Content-Length: 100000`, 16 bytes, then the client closes: the server logs one
    warning, no "Exception in ASGI application" traceback, and goes on answering."""
    import logging

    import uvicorn

    service = SearchService(served_bundle[1])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_config=None, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    caplog.set_level(logging.WARNING)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                      b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                      b"--b\r\nContent-Di")  # 16 bytes of a well-formed start
        deadline = time.monotonic() + 10
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(20)
        service.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "closed the connection before sending its whole request" in \
        lines[0] and "(POST /search)" in lines[0], lines  # fmt: skip
    assert all(r.exc_info is None for r in caplog.records)
