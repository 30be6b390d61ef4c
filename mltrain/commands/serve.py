"""Serve a bundle over HTTP: python -m mltrain serve BUNDLE [--host 127.0.0.1] [--port 8000]

  POST /search   multipart field `image`; `k`, `rerank`, `class` (hits of that class only),
                 `threshold` (auto, none or a cosine in [-1, 1]) as form fields or in the
                 query string -> {"results":
                 [{rank, score, class, path, id, thumb, match?}], "k", "rerank",
                 "threshold"?, "threshold_resolved"?, "answer"?, "embed_ms", "search_ms"}
  POST /verify   multipart fields `a` and `b`, optional `far` (a calibrated FAR, default
                 1e-3) -> {score, threshold, same, far, threshold_resolved}
  GET  /thumb/ID JPEG thumbnail of bundle row ID
  GET  /health   status, images, classes, model, dim, metric, threshold, threshold_resolved,
                 batch sizes seen
  GET  /         a page: drop a photo, see its nearest images; drop a second, verify
  GET  /favicon.ico  204 (the page's icon is inline)

`threshold_resolved` comes with a calibrated threshold: false when the bundle's held-out
data had too few impostor pairs to resolve its FAR, so it is approximate (a note at start
says so too).

Binds to loopback by default: put a reverse proxy in front to expose it (README, Serve).
The port is taken before the bundle is loaded, so a busy port fails at once, in one line.
Bad uploads (empty, not an image, over --max-upload-mb or --max-pixels) get a 4xx JSON
answer with a one-line `detail`; the server keeps running.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations as
# objects, and `Request` is imported inside create_app (the serve extra is optional).
import argparse
import errno
import importlib.util
import logging
import socket
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

from mltrain.errors import BundleError, ConfigError, DataError, MltrainError, check_number
from mltrain.text import printable

INSTALL = "install the serve extra: pip install -e '.[serve]'"
# Upper limits of the size flags: past them the server holds more than a machine has
# (two uploads per /verify, 3 bytes per decoded pixel, a batch of decoded images at once).
MAX_UPLOAD_MB = 1024
MAX_PIXELS = 1e9
MAX_BATCH = 1024
PAGE = "index.html"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mltrain serve", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("bundle", help="search bundle folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--image-root", help="the bundle's images are now here (thumbnails)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest accepted image file, MB (default 20)")
    p.add_argument("--max-pixels", type=float, default=40e6,
                   help="largest accepted image, pixels (default 40e6)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most uploads embedded in one model call (default 16)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx", "openvino"), default="auto",
                   help="embed uploads with PyTorch, the bundle's model.onnx (export --onnx) "
                        "or OpenVINO (the openvino extra); auto: the fastest measured for a "
                        "server's many single queries")
    return p


def _require_serve_extra() -> None:
    found = importlib.util.find_spec
    missing = [m for m in ("fastapi", "uvicorn") if found(m) is None]
    if found("python_multipart") is None and found("multipart") is None:  # new and old name
        missing.append("python-multipart")
    if missing:
        raise MltrainError(f"mltrain serve needs {', '.join(missing)}: {INSTALL}")


def page_html() -> str:
    return resources.files("mltrain.commands").joinpath("static", PAGE).read_text("utf-8")


def status_of(e: MltrainError) -> int:
    """HTTP status for a service error: the limit broken, the input or the bundle at fault."""
    from mltrain.data.images import ImageTooLarge
    from mltrain.inference.onnx import OnnxUnavailable
    from mltrain.retrieval.service import NotFound, UploadTooLarge

    if isinstance(e, OnnxUnavailable):
        return 503  # the server's model cannot run: not the request's fault
    if isinstance(e, (UploadTooLarge, ImageTooLarge)):
        return 413
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, (DataError, ConfigError)):
        return 400
    if isinstance(e, BundleError):
        return 409  # the bundle cannot do this (e.g. verify without a calibrated threshold)
    return 400


def create_app(service: Any):
    """The FastAPI app over a `mltrain.retrieval.service.SearchService`. Blocking work runs
    in Starlette's thread pool, so concurrent requests meet in the service's micro-batcher."""
    _require_serve_extra()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="mltrain search", docs_url=None, redoc_url=None, openapi_url=None)
    body_limit = 2 * service.max_upload_bytes + 2**16  # two images (verify) plus form fields

    @app.exception_handler(MltrainError)
    async def _user_error(request: Request, e: MltrainError):
        return JSONResponse({"detail": str(e)}, status_code=status_of(e))

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, e: ClientDisconnect):
        # A client that hangs up mid-body (a dropped connection, a killed script) is routine
        # for a server: one line in its log, not "Exception in ASGI application" and a
        # traceback. Nobody is left to read the answer.
        client = request.client
        who = f"{client.host}:{client.port}" if client else "a client"
        logging.getLogger("uvicorn.error").warning(
            "%s closed the connection before sending its whole request (%s %s); dropped it",
            who, request.method, printable(request.url.path[:100]))  # fmt: skip
        return Response(status_code=400)

    app.add_middleware(BodyLimit, limit=body_limit,
                       per_image=service.max_upload_bytes)  # fmt: skip

    async def upload(form, field: str) -> bytes:
        item = form.get(field)
        if item is None or isinstance(item, str):
            raise DataError(f"send the image as the multipart file field {field!r}")
        return await item.read(service.max_upload_bytes + 1)  # one byte over: "too large"

    def param(request: Request, form, name: str) -> str | None:
        value = form.get(name)
        value = request.query_params.get(name) if value is None else value
        return value if isinstance(value, str) else None

    @app.post("/search")
    async def search(request: Request):
        async with request.form(max_files=1, max_fields=10) as form:  # closes spooled files
            data = await upload(form, "image")
            k_text = param(request, form, "k")
            rerank = param(request, form, "rerank") or "auto"
            threshold = param(request, form, "threshold")
            class_name = param(request, form, "class")
        try:
            k = None if k_text in (None, "") else int(k_text)
        except ValueError:
            raise ConfigError(f"k must be an integer, got {k_text[:40]!r}") from None
        return await run_in_threadpool(service.search, data, k, rerank, threshold, "image",
                                       class_name)  # fmt: skip

    @app.post("/verify")
    async def verify(request: Request):
        async with request.form(max_files=2, max_fields=10) as form:
            a, b = await upload(form, "a"), await upload(form, "b")
            far = param(request, form, "far")
        return await run_in_threadpool(service.verify, a, b, far)

    @app.get("/thumb/{row}")
    async def thumb(row: str):
        jpeg = await run_in_threadpool(service.thumbnail, row)
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})  # fmt: skip

    @app.get("/health")
    async def health():
        return service.health()

    html = page_html()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP})

    @app.get("/favicon.ico")
    async def favicon():
        # The page links its icon inline; browsers that ask here anyway get "nothing", not a
        # 404 in the server's log.
        return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})

    return app


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, whether its
    Content-Length says so up front or a chunked body grows past it while it is read (the
    multipart parser would otherwise spool any amount to disk before the endpoint runs)."""

    def __init__(self, app, limit: int, per_image: int) -> None:
        self.app, self.limit, self.per_image = app, limit, per_image

    def message(self, size: str) -> str:
        return (f"request body of {size} bytes is over the {self.limit} byte limit (images "
                f"up to {self.per_image / 2**20:g} MB each)")  # fmt: skip

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared and (not declared.isdigit() or int(declared) > self.limit):
            from fastapi.responses import JSONResponse

            response = JSONResponse({"detail": self.message(declared[:20])}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:  # an HTTPException: the app answers it as JSON
                from fastapi import HTTPException

                raise HTTPException(413, self.message(f"more than {self.limit}"))
            return msg

        await self.app(scope, limited, send)


# The page needs nothing from elsewhere: its own script and style, thumbnails from here and
# the browser's own object URLs for the dropped photos, and its icon as a data: URI.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src 'self' blob: data:; connect-src 'self'")  # fmt: skip


def service_from_args(args: argparse.Namespace, embedder_factory: Any = None):
    """The service for parsed arguments. `embedder_factory(bundle) -> Embedder` picks the
    inference backend; by default `--backend` does (a bundle without model.onnx asked for
    onnx stops here, before the server starts)."""
    from mltrain.inference.backends import SERVICE_IMAGES
    from mltrain.retrieval.bundle_model import bundle_embedder
    from mltrain.retrieval.service import SearchService

    backend = getattr(args, "backend", "auto")
    embedder_factory = embedder_factory or (
        lambda b: bundle_embedder(b, backend, images=SERVICE_IMAGES, per_call=1))

    return SearchService(args.bundle, args.image_root,
                         max_upload_bytes=int(args.max_upload_mb * 2**20),
                         max_pixels=int(args.max_pixels), max_batch=args.max_batch,
                         embedder_factory=embedder_factory)  # fmt: skip


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) as uvicorn would bind it (SO_REUSEADDR, IPv6 for a
    host with a colon), handed to the server later: a busy port or a foreign address is one
    line now, before the bundle and model load, and no other program can take the port in
    between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(_bind_error(host, port, e)) from None
    return sock


def _bind_error(host: str, port: int, e: OSError) -> str:
    where = f"port {port} on {printable(host)}"
    if e.errno == errno.EADDRINUSE:
        return f"{where} is already in use; pick another with --port"
    if e.errno == errno.EACCES:
        return f"{where} needs privileges (ports below 1024 do); pick one above 1023 with --port"
    if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
        what = "names no address" if isinstance(e, socket.gaierror) else "is no address here"
        return (f"--host {printable(host)} {what}; use 127.0.0.1 (this machine only) or "
                "0.0.0.0 (every interface)")  # fmt: skip
    return f"cannot listen on {where} ({e.strerror or e}); pick another --host or --port"


def check_args(args: argparse.Namespace) -> None:
    """Arguments that are wrong on their face, refused before anything is loaded."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port number (0-65535)")
    check_number("--max-upload-mb", args.max_upload_mb, 0, MAX_UPLOAD_MB, low_open=True,
                 what="MB per image")  # fmt: skip
    check_number("--max-pixels", args.max_pixels, 0, MAX_PIXELS, low_open=True,
                 what="pixels per decoded image")  # fmt: skip
    check_number("--max-batch", args.max_batch, 1, MAX_BATCH, what="uploads per model call")


def announce(args: argparse.Namespace, service: Any, port: int) -> None:
    """The server's URL on stdout; notes on stderr for an exposed host, a missing image
    root and an approximate default threshold."""
    from mltrain.retrieval.verify import calibration_note

    health = service.health()
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {printable(args.bundle)} ({health['images']} images, "
          f"{health['classes']} classes) at http://{host}:{port}/  (Ctrl-C stops)",
          flush=True)  # fmt: skip
    notes = []
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        notes.append(f"--host {printable(args.host)} is reachable from other machines; there "
                     "is no TLS or authentication here, put a reverse proxy in front (README, "
                     "Serve)")  # fmt: skip
    if not service.bundle.root.is_dir():
        notes.append(f"the bundle's image root {printable(service.bundle.root)} is missing "
                     "here, so thumbnails will not show; pass --image-root")  # fmt: skip
    if service.calibration is not None and (note := calibration_note(service.calibration)):
        notes.append(f"{note} (/search and /verify use it)")
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    _require_serve_extra()
    check_args(args)
    import uvicorn

    sock = bind_port(args.host, args.port)
    try:
        service = service_from_args(args)
        try:
            app = create_app(service)
            announce(args, service, sock.getsockname()[1])
            config = uvicorn.Config(app, log_level="warning")
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            service.close()
    finally:
        sock.close()
