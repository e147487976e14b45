"""``mist-cloud serve``: the test-time half of MIST over HTTP. An image comes in, its Gather* sums go out.

The backbone is built by ``extract.load_frozen`` and every batch goes through ``FrozenBackbone.gather``, the
calls ``extract`` makes, after the same decode (``Image.open(...).convert("RGB")``) and the same eval
transform, so a served image's features are the ones ``extract`` writes for it.

Concurrent requests are batched dynamically: the forward thread takes the first waiting request, waits at
most ``max_wait`` for more, up to ``max_batch`` images, and runs them as one forward.

Safe by default: loopback only, a bearer token checked before any body is read, capped bodies and pixel
counts, a deadline for slow clients (headers and body), a bounded queue that answers 503, and a one-line
JSON error for anything a client got wrong. No request can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import socket
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mist.formats.served import LAYOUT_HEADER, MEDIA_TYPE, encode_features, served_layout

from .errors import CloudError

if TYPE_CHECKING:  # torch loads with the backbone, so a bad flag is refused before it
    import torch

    from .extract import FrozenBackbone

Log = Callable[[str], None]

# Decoders for the formats a camera or a phone sends. Pillow can open more (EPS would start Ghostscript),
# and a service has no reason to run those on bytes from the network.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
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


class RequestError(Exception):
    """A client's mistake: answered with ``status`` and a one-line JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---- decoding ---------------------------------------------------------------------------------------------


def decode_image(data: bytes, transform: Callable, max_pixels: int, name: str) -> torch.Tensor:
    """Image bytes -> the transformed (C, H, W) tensor, as ``Source.load`` and the extract transform make it."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(400, f"{name}: empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size  # from the header: nothing is decoded yet
                if width * height > max_pixels:
                    raise RequestError(413, f"{name}: {width}x{height} is {width * height:,} pixels, more than "
                                            f"the server's --max-pixels {max_pixels:,}")
                rgb = image.convert("RGB")  # the full decode
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(413, f"{name}: refused as a decompression bomb ({_first_line(e)})") from None
    except UnidentifiedImageError:
        raise RequestError(422, f"{name}: not an image ({', '.join(IMAGE_FORMATS)} are accepted)") from None
    except Exception as e:  # decoders raise many types for damaged data: OSError, SyntaxError, ValueError...
        raise RequestError(422, f"{name}: unreadable image ({e.__class__.__name__}: {_first_line(e)})") from None
    return transform(rgb)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


# ---- dynamic batching -------------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class Batcher:
    """Gather queued requests into forwards of at most ``max_batch`` images, one forward at a time.

    ``pending`` counts the images queued or in the forward; ``submit`` refuses a request that would take it
    past ``max_queue``, so memory stays bounded however many clients arrive. ``arriving`` counts the requests
    admitted but still being read or decoded: a forward waits for company only while some are, so a lone
    client never pays the wait.
    """

    def __init__(self, forward: Callable[[torch.Tensor], np.ndarray], max_batch: int, max_wait_s: float,
                 max_queue: int):
        self.forward, self.max_batch, self.max_wait_s, self.max_queue = forward, max_batch, max_wait_s, max_queue
        self.pending = self.arriving = 0
        self.forwards = self.images = 0
        self._queue: deque[tuple[torch.Tensor, asyncio.Future]] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mist-forward")

    def has_room(self, n: int) -> bool:
        return self.pending + n <= self.max_queue

    async def submit(self, images: torch.Tensor) -> np.ndarray:
        n = len(images)
        if not self.has_room(n):
            raise QueueFull
        self.pending += n
        future = asyncio.get_running_loop().create_future()
        self._queue.append((images, future))
        self._wake.set()
        try:
            return await future
        finally:
            self.pending -= n

    async def run(self) -> None:
        import torch

        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = [self._queue.popleft()]
            count = len(batch[0][0])
            deadline = loop.time() + self.max_wait_s
            while count < self.max_batch:
                if self._queue:
                    if count + len(self._queue[0][0]) > self.max_batch:
                        break  # the next request waits for the next forward
                    batch.append(self._queue.popleft())
                    count += len(batch[-1][0])
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or self.arriving == 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [(images, future) for images, future in batch if not future.done()]
            if not batch:
                continue
            try:
                features = await loop.run_in_executor(self._executor, self.forward,
                                                      torch.cat([images for images, _ in batch]))
            except Exception as e:  # one bad batch (e.g. a float16 overflow) fails its requests, not the server
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.forwards += 1
            self.images += count
            start = 0
            for images, future in batch:
                if not future.done():
                    future.set_result(features[start:start + len(images)])
                start += len(images)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---- the application --------------------------------------------------------------------------------------


def build_app(frozen: FrozenBackbone, cfg: ServeConfig, log: Log = print):
    """The Starlette app serving ``frozen``'s Gather* sums under ``cfg``'s limits."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .backbones import make_transform
    from .extract import sum_dtype
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

    def authorize(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(401, "missing bearer token (send 'Authorization: Bearer TOKEN')")
        if not hmac.compare_digest(given.strip().encode(), token):
            raise RequestError(401, "wrong bearer token")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, f"bad Content-Length {declared[:40]!r}")
            if int(declared) > cfg.max_body_bytes:
                raise RequestError(413, f"body of {int(declared):,} bytes is over the server's --max-body-bytes "
                                        f"{cfg.max_body_bytes:,}")

        async def collect() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise RequestError(413, f"body is over the server's --max-body-bytes {cfg.max_body_bytes:,}")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(collect(), cfg.client_timeout)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the body did not arrive within {cfg.client_timeout:g} s") from None
        except ClientDisconnect:
            raise RequestError(400, "the client disconnected mid-body") from None

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

        try:
            form = await MultiPartParser(request.headers, replay(), max_files=cfg.max_images, max_fields=8,
                                         max_part_size=64 * 1024).parse()
        except MultiPartException as e:
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
        authorize(request)  # before the body is read: an unauthorised request costs no work
        if not batcher.has_room(1):
            raise QueueFull
        batcher.arriving += 1
        try:
            body = await read_body(request)
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
        authorize(request)
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
                log(f"serve: internal error on {request.url.path}: {e.__class__.__name__}: {_first_line(e)}")
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

TOKEN_ENV = "MIST_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def read_token(token_file: str | None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$MIST_SERVE_TOKEN``, else None (no auth)."""
    import os

    if token_file is not None:
        try:
            text = open(token_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise CloudError(f"--token-file {token_file}: unreadable ({getattr(e, 'strerror', None) or e})") from None
        where, token = f"--token-file {token_file}", (text.splitlines() or [""])[0].strip()
    elif os.environ.get(TOKEN_ENV) is not None:
        where, token = f"${TOKEN_ENV}", os.environ[TOKEN_ENV].strip()
    else:
        return None
    if len(token) < 16:
        raise CloudError(f"{where}: the token must be at least 16 characters (e.g. `openssl rand -hex 32`)")
    if not all(33 <= ord(c) < 127 for c in token):
        raise CloudError(f"{where}: the token must be printable ASCII without spaces")
    return token


def check_safety(cfg: ServeConfig, log: Log) -> None:
    """Refuse a half-configured TLS or an unreadable certificate; warn about an exposed, open server."""
    import ssl

    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise CloudError("--tls-cert and --tls-key go together")
    if cfg.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise CloudError(f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key}: not a usable certificate "
                             f"and key ({getattr(e, 'strerror', None) or e.__class__.__name__})") from None
    if cfg.host not in LOOPBACK:
        if cfg.token is None:
            log(f"serve: WARNING: --host {cfg.host} without a token: anyone who reaches it can use the backbone")
        elif not cfg.tls_cert:
            log(f"serve: WARNING: --host {cfg.host} without TLS: the token crosses the network in clear text")


def guarded_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol, plus a deadline for a request's headers.

    uvicorn times out idle keep-alive connections but not a client that trickles its headers in byte by byte
    (slowloris); such a connection would hold its socket forever. Here it gets a 408 and is closed.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"error": f"the request headers did not arrive within {header_timeout:g} s",
                       "status": 408}).encode()
    timeout_response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            # IDLE on our side's peer: no complete request line and headers yet in this cycle.
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.write(timeout_response)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # uvicorn writes the status line and headers, then the body: without this, Nagle's algorithm
                # holds the body until the client's delayed ACK, ~40 ms on every answer (measured).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


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
    config = uvicorn.Config(
        app, http=guarded_protocol(cfg.client_timeout), ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key,
        limit_concurrency=cfg.max_connections, timeout_keep_alive=5, log_level="warning", access_log=False,
        lifespan="on", h11_max_incomplete_event_size=16 * 1024)
    server = uvicorn.Server(config)
    scheme = "https" if cfg.tls_cert else "http"
    port = sock.getsockname()[1]
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log(f"serve: layout {app.state.fingerprint[:12]} ({frozen.backbone.name}, groups {frozen.groups}, "
        f"T={frozen.tokens}, d={frozen.dim}, {cfg.scale}, {cfg.dtype}); batches of up to {cfg.max_batch}, "
        f"waiting {cfg.max_wait_ms:g} ms; token {'required' if cfg.token else 'NOT required'}")
    log(f"serve: listening on {scheme}://{host}:{port}")
    server.run(sockets=[sock])
