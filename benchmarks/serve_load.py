"""Load test of `mltrain serve`: N concurrent clients x M queries against the real server on
loopback, against one query at a time from the command line and in process.

    python benchmarks/serve_load.py [--bundle DIR] [--clients 8] [--queries 25]
                                    [--cli-runs 3] [--max-seconds 120]

Without `--bundle` a gallery of generated shapes (`--images`, four classes) is embedded with
the pooling config's backbone (untrained head, `--backbone` / `--pretrained` /
`--image-size` to change) into a temporary flat bundle. Every query is a gallery image, so
the right answer is known: its top hit must be itself. Rows:

- CLI process: `python -m mltrain search BUNDLE IMAGE --json`, the whole process (start-up,
  imports, bundle check, model build, one query), median of `--cli-runs`;
- in process: `search_images` on one image per call, bundle and model already loaded;
- server, 1 client: sequential POST /search from one client (HTTP, decode, embed, search);
- server, N clients: N threads, each M queries, all at once (micro-batched).

It reports median and p99 latency, queries/s, errors and wrong answers (both must be 0) and
each row's queries/s over the CLI's, with the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/serve_load.py`
    import common  # type: ignore[no-redef]

REPO = common.REPO


def build_bundle(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(image root, bundle) of a generated gallery, embedded in this process."""
    from mltrain.inference.embedder import embedder_from_backbone
    from mltrain.retrieval.export import export_bundle
    from tests.conftest import write_shapes_gallery

    root = write_shapes_gallery(work / "images", per_class=max(1, args.images // 4), size=96)
    cfg = common.config_for("pooling", root, [
        "data.split=none", "data.num_workers=0", "export.index=flat",
        *common.model_overrides(args)])  # fmt: skip
    onnx = importlib.util.find_spec("onnxruntime") is not None  # so --backend can pick either
    return root, export_bundle(embedder_from_backbone(cfg), work / "bundle", "serve benchmark",
                               onnx=onnx)  # fmt: skip


def gallery_queries(bundle_dir: Path, limit: int) -> list[tuple[Path, str]]:
    """(file, its metadata path) for up to `limit` gallery images spread over the bundle."""
    from mltrain.retrieval.bundle import load_bundle, safe_image_path

    bundle = load_bundle(bundle_dir)
    rows = np.linspace(0, len(bundle) - 1, min(limit, len(bundle))).round().astype(int)
    out = []
    for r in dict.fromkeys(rows.tolist()):
        rel = bundle.metadata[r]["path"]
        out.append((safe_image_path(bundle, rel), rel))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, timeout: float,
                 backend: str = "auto") -> tuple[subprocess.Popen, str, float]:  # fmt: skip
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mltrain", "serve", str(bundle), "--port",
                             str(port), "--backend", backend], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.1)


class Tally:
    """Latencies, errors and wrong answers, filled by several client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors = 0
        self.wrong = 0
        self.first_error = ""

    def add(self, seconds: float, ok: bool, right: bool, error: str = "") -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.errors += not ok
            self.wrong += ok and not right
            if error and not self.first_error:
                self.first_error = error[:200]


def client(url: str, queries: list[tuple[bytes, str]], n: int, tally: Tally, start: int,
           deadline: float, barrier: threading.Barrier | None) -> None:  # fmt: skip
    import httpx

    with httpx.Client(base_url=url, timeout=60) as c:
        if barrier is not None:
            barrier.wait()
        for i in range(n):
            if time.perf_counter() > deadline:
                return
            data, expected = queries[(start + i) % len(queries)]
            t0 = time.perf_counter()
            try:
                r = c.post("/search", files={"image": ("q", data)}, params={"k": 5})
                ok = r.status_code == 200
                top = r.json()["results"][0]["path"] if ok else None
                tally.add(time.perf_counter() - t0, ok, top == expected,
                          "" if ok else f"HTTP {r.status_code}: {r.text}")
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                tally.add(time.perf_counter() - t0, False, False, repr(e))


def load(url: str, queries: list[tuple[bytes, str]], clients: int, per_client: int,
         max_seconds: float) -> tuple[Tally, float]:  # fmt: skip
    """`clients` threads of `per_client` queries each, started together: (tally, wall s)."""
    tally = Tally()
    barrier = threading.Barrier(clients + 1)
    deadline = time.perf_counter() + max_seconds
    threads = [threading.Thread(target=client, args=(url, queries, per_client, tally,
                                                     i * per_client, deadline, barrier))
               for i in range(clients)]  # fmt: skip
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return tally, time.perf_counter() - t0


def cli_latencies(bundle: Path, queries: list[tuple[Path, str]], runs: int,
                  backend: str = "auto") -> tuple[list, int]:  # fmt: skip
    """Seconds per whole `mltrain search --json` process, and how many answered wrong."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    times, wrong = [], 0
    import json

    for i in range(runs):
        path, expected = queries[i % len(queries)]
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "mltrain", "search", str(bundle), str(path),
                              "--json", "-k", "5", "--backend", backend], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        times.append(time.perf_counter() - t0)
        wrong += json.loads(out.stdout)["queries"][0]["results"][0]["path"] != expected
    return times, wrong


def in_process_latencies(bundle_dir: Path, queries: list[tuple[Path, str]], n: int,
                         backend: str = "auto"):  # fmt: skip
    from mltrain.retrieval.bundle import load_bundle
    from mltrain.retrieval.bundle_model import bundle_embedder
    from mltrain.retrieval.search import search_images

    bundle = load_bundle(bundle_dir)
    bundle_embedder(bundle, backend)
    search_images(bundle, [queries[0][0]], 5, "none", backend)  # warm-up
    times, wrong = [], 0
    for i in range(n):
        path, expected = queries[i % len(queries)]
        t0 = time.perf_counter()
        run = search_images(bundle, [path], 5, "none", backend)
        times.append(time.perf_counter() - t0)
        wrong += run.results[0].hits[0].path != expected
    return times, wrong


def row(name: str, latencies: list[float], wall: float, errors: int, wrong: int,
        base_qps: float | None) -> list:  # fmt: skip
    ms = np.asarray(latencies) * 1e3
    qps = len(latencies) / wall if wall > 0 else float("nan")
    ratio = qps / base_qps if base_qps else 1.0
    return [name, len(latencies), float(np.median(ms)), float(np.percentile(ms, 99)), qps,
            errors, wrong, ratio]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="an existing bundle (default: build one from shapes)")
    p.add_argument("--images", type=int, default=100, help="generated gallery size")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--queries", type=int, default=25, help="queries per client")
    p.add_argument("--cli-runs", type=int, default=3, help="whole `mltrain search` processes")
    p.add_argument("--max-seconds", type=float, default=120, help="stop the load after this")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="embed queries with PyTorch or the bundle's model.onnx (every mode)")
    common.add_model_args(p)
    args = p.parse_args(argv)
    if min(args.clients, args.queries, args.cli_runs, args.images) < 1:
        p.error("--clients, --queries, --cli-runs and --images must be at least 1")

    with tempfile.TemporaryDirectory(prefix="mltrain-serve-bench-") as tmp:
        bundle = Path(args.bundle) if args.bundle else build_bundle(args, Path(tmp))[1]
        queries = gallery_queries(bundle, 200)
        blobs = [(path.read_bytes(), rel) for path, rel in queries]
        cli, cli_wrong = cli_latencies(bundle, queries, args.cli_runs, args.backend)
        inproc, inproc_wrong = in_process_latencies(bundle, queries, min(50, len(queries) * 2),
                                                    args.backend)  # fmt: skip
        proc, url, startup = start_server(bundle, args.max_seconds, args.backend)
        try:
            one, one_wall = load(url, blobs, 1, min(args.queries, 50), args.max_seconds)
            many, many_wall = load(url, blobs, args.clients, args.queries, args.max_seconds)
            import httpx

            batches = httpx.get(url + "/health", timeout=10).json()["batches"]
        finally:
            proc.terminate()
            proc.wait(20)

    cli_qps = len(cli) / sum(cli)
    rows = [
        row("CLI process (mltrain search --json)", cli, sum(cli), 0, cli_wrong, None),
        row("in process (search_images)", inproc, sum(inproc), 0, inproc_wrong, cli_qps),
        row("server, 1 client", one.latencies, one_wall, one.errors, one.wrong, cli_qps),
        row(f"server, {args.clients} clients", many.latencies, many_wall, many.errors,
            many.wrong, cli_qps),
    ]  # fmt: skip
    rows[0][-1] = 1.0
    print(f"\n{len(queries)} gallery images as queries, bundle {bundle.name}; server started "
          f"in {startup:.1f} s; {common.load_note()}")  # fmt: skip
    print(common.markdown_table(["mode", "queries", "p50 ms", "p99 ms", "queries/s", "errors",
                                 "wrong", "x CLI q/s"], rows))  # fmt: skip
    sizes = {int(k): v for k, v in batches.items()}
    print(f"micro-batches by size: {dict(sorted(sizes.items()))}")
    if many.first_error or one.first_error:
        print(f"first error: {many.first_error or one.first_error}")
    return {"rows": rows, "batches": sizes, "errors": one.errors + many.errors,
            "wrong": one.wrong + many.wrong + cli_wrong + inproc_wrong, "startup_s": startup,
            "cli_median_s": statistics.median(cli)}  # fmt: skip


if __name__ == "__main__":
    main()
