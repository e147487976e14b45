"""``mist-cloud serve``: the test-time half of MIST over HTTP. An image comes in, its Gather* sums go out.

This module is the app: its routes, request parsing and answers (``build_app``), and the start-up that binds
and runs it (``serve``). The backbone is built by ``frozen.load_frozen`` and every batch goes through
``FrozenBackbone.gather``, the calls ``extract`` makes, after the same decode (``images.to_rgb``) and the same
eval transform, so a served image's features are the ones ``extract`` writes for it.

Concurrent requests share forwards through ``batcher.Batcher``. What keeps the server safe by default (the
bearer token, capped bodies and pixel counts, deadlines for slow clients, TLS checks) is in ``serve_guard``;
here a full queue answers 503 and anything a client got wrong a one-line JSON error. No request can stop
the server.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mist.formats.served import LAYOUT_HEADER, MEDIA_TYPE, certificate_pin, encode_features, served_layout

from .batcher import Batcher, QueueFull
from .errors import CloudError
from .serve_guard import RequestError, authorize, decode_image, first_line, guarded_protocol, read_body

if TYPE_CHECKING:  # torch loads with the backbone, so a bad flag is refused before it
    import torch

    from .frozen import FrozenBackbone

Log = Callable[[str], None]

RAW_TYPES = ("image/", "application/octet-stream")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8750
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    scale: str = "none"
    dtype: str = "float16"
    max_batch: int = 16  # images per backbone forward (1: one at a time)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # images waiting or in the forward; beyond it requests get 503
    max_images: int = 16  # images in one request
    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 25_000_000  # decompression-bomb guard, checked from the header before decoding
    client_timeout: float = 10.0  # seconds for a client to send its headers, and again its body
    max_connections: int = 64  # open connections; beyond it uvicorn answers 503
    decode_threads: int = 2


# ---- the application --------------------------------------------------------------------------------------


def build_app(frozen: FrozenBackbone, cfg: ServeConfig, log: Log = print):
    """The Starlette app serving ``frozen``'s Gather* sums under ``cfg``'s limits."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .backbones import make_transform
    from .frozen import sum_dtype
    from .taps import GroupTap

    layout = served_layout(frozen.manifest(cfg.scale, cfg.dtype, classes=[], split="serve", dataset={}))
    fingerprint = layout.layout_fingerprint()
    transform = make_transform(frozen.backbone.data_config)
    tap = GroupTap(frozen.model, frozen.layers, frozen.groups)

    import torch

    def forward(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return frozen.gather(tap, images, cfg.scale, sum_dtype(cfg.dtype)).numpy()

    batcher = Batcher(forward, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue)
    decoder = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="mist-decode")
    token = cfg.token.encode() if cfg.token else None
    started = time.time()

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    async def split_images(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind.startswith(RAW_TYPES):
            return [("image", body)]
        if kind != "multipart/form-data":
            raise RequestError(415, f"content type {kind or 'none'!r}: send one image (image/*, "
                                    "application/octet-stream) or several as multipart/form-data")

        async def replay() -> AsyncIterator[bytes]:
            yield body

        try:  # one file more than allowed still parses, so that too many images get their 413 below
            form = await MultiPartParser(request.headers, replay(), max_files=cfg.max_images + 1, max_fields=8,
                                         max_part_size=64 * 1024).parse()
        except MultiPartException as e:
            if "too many files" in e.message.lower():
                raise RequestError(413, f"more than {cfg.max_images} images in one request; the server takes at "
                                        f"most {cfg.max_images} (--max-images)") from None
            raise RequestError(400, f"bad multipart body: {e.message}") from None
        parts = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append((f"part {len(parts)} ({value.filename or key!r})", await value.read()))
                await value.close()
        await form.close()
        if not parts:
            raise RequestError(400, "the multipart body holds no file parts")
        return parts

    async def features(request: Request) -> Response:
        authorize(request, token)  # before the body is read: an unauthorised request costs no work
        if not batcher.has_room(1):
            raise QueueFull
        batcher.arriving += 1
        try:
            body = await read_body(request, cfg.max_body_bytes, cfg.client_timeout)
            parts = await split_images(request, body)
            if len(parts) > cfg.max_images:
                raise RequestError(413, f"{len(parts)} images in one request; the server takes at most "
                                        f"{cfg.max_images}")
            loop = asyncio.get_running_loop()
            tensors = await asyncio.gather(*(loop.run_in_executor(decoder, decode_image, data, transform,
                                                                  cfg.max_pixels, name) for name, data in parts))
            batch = torch.stack(tensors)
        finally:
            batcher.arriving -= 1
        sums = await batcher.submit(batch)
        return Response(encode_features(sums, layout), media_type=MEDIA_TYPE,
                        headers={LAYOUT_HEADER: fingerprint, "X-Mist-Images": str(len(parts))})

    async def layout_endpoint(request: Request) -> Response:
        authorize(request, token)
        return JSONResponse({"layout": layout.to_json(), "fingerprint": fingerprint,
                             "limits": {"max_images": cfg.max_images, "max_body_bytes": cfg.max_body_bytes,
                                        "max_pixels": cfg.max_pixels, "max_batch": cfg.max_batch}},
                            headers={LAYOUT_HEADER: fingerprint})

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "queued_images": batcher.pending, "forwards": batcher.forwards,
                             "images": batcher.images, "uptime_s": round(time.time() - started, 1)})

    def guarded(endpoint: Callable) -> Callable:
        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request)
            except RequestError as e:
                headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
                return error(e.status, str(e), headers)
            except QueueFull:
                return error(503, f"the queue is full ({cfg.max_queue} images); retry shortly", {"Retry-After": "1"})
            except CloudError as e:
                return error(422, str(e))
            except Exception as e:  # a bug: the client gets one line, the log the details, the server goes on
                log(f"serve: internal error on {request.url.path}: {e.__class__.__name__}: {first_line(e)}")
                return error(500, f"internal error ({e.__class__.__name__})")

        return handle

    async def http_error(_request: Request, e: HTTPException) -> Response:
        return error(e.status_code, str(e.detail))

    async def lifespan(_app) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            worker.cancel()
            batcher.close()
            decoder.shutdown(wait=False, cancel_futures=True)
            tap.close()

    from contextlib import asynccontextmanager

    routes = [Route("/v1/features", guarded(features), methods=["POST"]),
              Route("/v1/layout", guarded(layout_endpoint), methods=["GET"]),
              Route("/healthz", guarded(healthz), methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                    lifespan=asynccontextmanager(lifespan))
    app.state.layout, app.state.fingerprint = layout, fingerprint
    return app


# ---- the server -------------------------------------------------------------------------------------------


def serve(frozen: FrozenBackbone, cfg: ServeConfig, log: Log = print) -> None:
    """Bind, log one 'listening on' line, and serve until SIGINT/SIGTERM."""
    import uvicorn

    app = build_app(frozen, cfg, log)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise CloudError(f"--host {cfg.host} --port {cfg.port}: cannot bind ({e.strerror or e})") from None
    sock.listen(128)  # connections wait in the backlog until uvicorn takes over the socket
    config = uvicorn.Config(  # no limit_concurrency: guarded_protocol enforces --max-connections, in JSON
        app, http=guarded_protocol(cfg.client_timeout, cfg.max_connections), ssl_certfile=cfg.tls_cert,
        ssl_keyfile=cfg.tls_key, timeout_keep_alive=5, log_level="warning", access_log=False,
        lifespan="on", h11_max_incomplete_event_size=16 * 1024)
    server = uvicorn.Server(config)
    scheme = "https" if cfg.tls_cert else "http"
    port = sock.getsockname()[1]
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log(f"serve: layout {app.state.fingerprint[:12]} ({frozen.backbone.name}, groups {frozen.groups}, "
        f"T={frozen.tokens}, d={frozen.dim}, {cfg.scale}, {cfg.dtype}); batches of up to {cfg.max_batch}, "
        f"waiting {cfg.max_wait_ms:g} ms; token {'required' if cfg.token else 'NOT required'}")
    if cfg.tls_cert:
        log(f"serve: TLS certificate {certificate_pin(cfg.tls_cert)} (devices pin it: mist-device predict "
            "--server-pin)")
    log(f"serve: listening on {scheme}://{host}:{port}")
    server.run(sockets=[sock])
