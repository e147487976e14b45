"""What keeps ``mist-cloud serve`` safe by default, apart from its routes.

- at start-up: the bearer token (one rule with the client, ``mist.formats.served.read_token``), a TLS
  certificate that loads, a warning for a server reachable from the network without a token or TLS;
- per request: the token checked before any body is read, a capped body with a deadline, images from the
  formats a camera sends only, their pixel count checked from the header before decoding;
- per connection: a deadline for a request's headers (``guarded_protocol``), which uvicorn lacks.

A client's mistake raises ``RequestError``, which the app answers with its status and a one-line JSON error.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import socket
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from mist.formats import FormatError, served

from .errors import CloudError

if TYPE_CHECKING:
    import torch
    from starlette.requests import Request

    from .serve import ServeConfig

Log = Callable[[str], None]

# Decoders for the formats a camera or a phone sends. Pillow can open more (EPS would start Ghostscript),
# and a service has no reason to run those on bytes from the network.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class RequestError(Exception):
    """A client's mistake: answered with ``status`` and a one-line JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


# ---- start-up ---------------------------------------------------------------------------------------------


def read_token(token_file: str | None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$MIST_SERVE_TOKEN``, else None (no auth)."""
    try:
        return served.read_token(token_file)
    except FormatError as e:
        raise CloudError(str(e)) from None


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


# ---- per request ------------------------------------------------------------------------------------------


def authorize(request: Request, token: bytes | None) -> None:
    """Refuse a request without the bearer ``token`` (None: no token required), in constant time."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestError(401, "missing bearer token (send 'Authorization: Bearer TOKEN')")
    if not hmac.compare_digest(given.strip().encode(), token):
        raise RequestError(401, "wrong bearer token")


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The whole body, refused past ``max_bytes`` (from Content-Length, or as it streams when chunked) and
    when it has not arrived within ``timeout`` seconds."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"bad Content-Length {declared[:40]!r}")
        if int(declared) > max_bytes:
            raise RequestError(413, f"body of {int(declared):,} bytes is over the server's --max-body-bytes "
                                    f"{max_bytes:,}")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, f"body is over the server's --max-body-bytes {max_bytes:,}")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected mid-body") from None


def decode_image(data: bytes, transform: Callable, max_pixels: int, name: str) -> torch.Tensor:
    """Image bytes -> the transformed (C, H, W) tensor, through the decoder ``extract`` uses (``images.to_rgb``:
    EXIF orientation, transparency over white, 16-bit and float greys scaled), so a served image's pixels are
    the ones its extracted twin had."""
    from PIL import Image, UnidentifiedImageError

    from .images import to_rgb

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
                rgb = to_rgb(image, name)  # the full decode, as extract does it
    except RequestError:
        raise
    except CloudError as e:  # a mode with no faithful RGB conversion (LAB, ...): extract skips such a file
        raise RequestError(422, str(e)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(413, f"{name}: refused as a decompression bomb ({first_line(e)})") from None
    except UnidentifiedImageError:
        raise RequestError(422, f"{name}: not an image ({', '.join(IMAGE_FORMATS)} are accepted)") from None
    except Exception as e:  # decoders raise many types for damaged data: OSError, SyntaxError, ValueError...
        raise RequestError(422, f"{name}: unreadable image ({e.__class__.__name__}: {first_line(e)})") from None
    return transform(rgb)


# ---- per connection ---------------------------------------------------------------------------------------


def _json_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer with the one-line JSON error body every route answers with, closing."""
    body = json.dumps({"error": message, "status": status}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol, plus a deadline for a request's headers, and JSON bodies for the answers uvicorn
    itself would give in plain text.

    uvicorn times out idle keep-alive connections but not a client that trickles its headers in byte by byte
    (slowloris); such a connection would hold its socket forever. Here it gets a 408 and is closed. A request
    h11 cannot parse (a bad Content-Length, oversized headers) gets a 400, and a connection beyond
    ``max_connections`` a 503 (uvicorn's own limit is off, it answers in plain text), both as one-line JSON.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout_response = _json_response(408, "Request Timeout",
                                      f"the request headers did not arrive within {header_timeout:g} s")
    bad_request = _json_response(400, "Bad Request", "malformed HTTP request (request line, headers or "
                                                     "Content-Length)")
    busy = json.dumps({"error": f"the server holds its --max-connections {max_connections} connections; retry "
                                "shortly", "status": 503}).encode()

    async def busy_app(_scope, _receive, send) -> None:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(busy)).encode()),
                                (b"connection", b"close"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": busy, "more_body": False})

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
            if len(self.connections) > max_connections:  # this one included: its requests all get the 503
                self.app = busy_app
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # uvicorn writes the status line and headers, then the body: without this, Nagle's algorithm
                # holds the body until the client's delayed ACK, ~40 ms on every answer (measured).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(bad_request)
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol
