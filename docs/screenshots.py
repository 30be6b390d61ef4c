"""Screenshots of the search page (`python -m mltrain serve`) at a desktop and a phone width.

    python docs/screenshots.py                       # a demo bundle, into docs/page-*.png
    python docs/screenshots.py --bundle B --query Q.jpg --second S.jpg

Without --bundle it builds a small demo: generated shape images filed under long class names
(where badges used to wrap) and a random-weight model, so it runs offline in seconds. It starts
the real server, drops the query and a second photo on the page in headless Chromium
(playwright) and saves one full-page PNG per width. Look at them after changing the page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python docs/screenshots.py` puts docs/, not the repo, first
    sys.path.insert(0, str(REPO))

WIDTHS = (1400, 420)
# Demo classes: long names, one with no spaces, as real data sets have.
LONG_NAMES = {
    "circle": "Long-tailed tit (Aegithalos caudatus)",
    "square": "Eurasian_collared_dove_Streptopelia_decaocto",
    "stripes": "zebra crossing, night",
    "triangle": "triangle",
}


def demo_bundle(base: Path) -> tuple[Path, Path, Path]:
    """(bundle, query image, second image) of the demo: see the module docstring."""
    from mltrain.retrieval.export import export_bundle
    from tests.conftest import tiny_embedder, write_shapes_gallery

    root = write_shapes_gallery(base / "data", per_class=6, size=96)
    for short, long in LONG_NAMES.items():
        (root / short).rename(root / long)
    images = sorted(p for p in root.rglob("img_*") if p.is_file())
    bundle = export_bundle(tiny_embedder(root, k=8), base / "bundle", "demo")
    query = next(p for p in images if p.parent.name == LONG_NAMES["circle"])
    second = next(p for p in images if p.parent.name == LONG_NAMES["square"])
    return bundle, query, second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(bundle: Path) -> tuple[subprocess.Popen, str]:
    """The real server on a free port, once /health answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mltrain", "serve", str(bundle), "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start; run `python -m mltrain serve BUNDLE` to see why")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no chromium on PATH (e.g. apt-get install -y chromium)")


def shoot(url: str, query: Path, second: Path | None, out: Path, widths: tuple[int, ...]) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            for width in widths:
                page = browser.new_page(viewport={"width": width, "height": 800})
                page.goto(url + "/")
                page.set_input_files("#query", str(query))
                page.wait_for_selector("#results .hit", timeout=60_000)
                if second is not None:
                    page.set_input_files("#second", str(second))
                    expect(page.locator("#verdict .why")).to_be_visible(timeout=60_000)
                images = page.locator("#results img")
                loaded = "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)"
                deadline = time.monotonic() + 30
                while not images.evaluate_all(loaded) and time.monotonic() < deadline:
                    time.sleep(0.1)
                path = out / f"page-{width}.png"
                page.screenshot(path=str(path), full_page=True)
                print(path)
                page.close()
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a bundle to serve (default: the demo)")
    parser.add_argument("--query", type=Path, help="the photo to search (with --bundle)")
    parser.add_argument("--second", type=Path, help="a photo to verify against the query")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for page-W.png")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    args = parser.parse_args(argv)
    if args.bundle is not None and args.query is None:
        parser.error("--bundle needs --query")
    with tempfile.TemporaryDirectory() as tmp:
        bundle, query, second = (
            (args.bundle, args.query, args.second) if args.bundle else demo_bundle(Path(tmp))
        )
        proc, url = serve(bundle)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            shoot(url, query, second, args.out, tuple(args.widths))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
