"""``mist-device predict ADAPTOR --server URL IMAGE...``: classify new images with a remote backbone.

The device never runs the backbone. It sends each image to ``mist-cloud serve``, gets back only the Gather*
sums (a safetensors feature shard), and runs its own adaptor on them. Only the standard library talks
HTTP here (urllib), so the device install stays numpy + click + safetensors.

Before sending any image the client reads the server's layout and refuses a server whose features would
mean something else than the ones the adaptor was trained on, naming the field, as ``evaluate`` does for a
feature set; every answer must then carry that same layout fingerprint.

With ``--server-pin`` the answers are trusted through the TLS channel they come on: the device accepts only a
server whose certificate has a pinned sha256 (``mist-cloud serve`` prints it), checked right after the TLS
handshake and before the token or any image is sent. docs/serve.md says why a pin rather than signed answers.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from mist.formats import FormatError, Manifest, check_compatible, served
from mist.formats.checkpoint import training_layout
from mist.formats.served import LAYOUT_HEADER, decode_features, der_pin

from .predictions import format_predictions, top_classes

TIMEOUT_S = 120.0  # a whole request: a busy CPU server forwards 16 Lite0 images in a few seconds
MAX_LAYOUT_BYTES = 1 << 20
MAX_ANSWER_BYTES = 256 << 20


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the bearer token to wherever it points; a mist server never redirects."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        return None  # urllib then raises the 3xx as an HTTPError


class PinMismatch(ssl.SSLError):
    """The server's certificate is not a pinned one: the connection is closed before anything is sent."""


def _pinned_connection(pins: tuple[str, ...]) -> type:
    class PinnedHTTPSConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()  # the TCP connection and the TLS handshake; no request byte has left yet
            der = self.sock.getpeercert(binary_form=True)
            found = der_pin(der) if der else "none"
            if found not in pins:
                self.sock.close()
                raise PinMismatch(f"the server's certificate {found} is not a pinned one (--server-pin); nothing "
                                  "was sent to it")

    return PinnedHTTPSConnection


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext, pins: tuple[str, ...]):
        super().__init__(context=context, check_hostname=False)
        self._connection = _pinned_connection(pins)

    def https_open(self, req):  # noqa: ANN001 - urllib's signature
        return self.do_open(self._connection, req, context=self._context)


class RemoteBackbone:
    """A ``mist-cloud serve`` endpoint: its checked layout, and features for image files."""

    def __init__(self, url: str, token: str | None = None, ca_cert: str | None = None, timeout: float = TIMEOUT_S,
                 pins: tuple[str, ...] = ()):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise click.UsageError(f"--server {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url, self.timeout = url.rstrip("/"), timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.context = None
        if token and parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "::1", "localhost"):
            click.echo(f"warning: --server {url} is plain http: the token and the images cross the network "
                       "in clear text", err=True)
        if parsed.scheme == "https" and pins:
            # The pin is the trust: a self-signed certificate needs no CA, and the name in it need not match.
            self.context = ssl.create_default_context()
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
        elif parsed.scheme == "https":
            try:
                self.context = ssl.create_default_context(cafile=ca_cert)
            except (OSError, ssl.SSLError) as e:
                raise click.ClickException(f"--ca-cert {ca_cert}: not a readable PEM certificate "
                                           f"({getattr(e, 'strerror', None) or e.__class__.__name__})") from None
        elif ca_cert or pins:
            raise click.UsageError(f"{'--ca-cert' if ca_cert else '--server-pin'} goes with an https:// --server")
        handlers: list = [_NoRedirects()]
        if self.context is not None and pins:
            handlers.append(_PinnedHTTPSHandler(self.context, pins))
        elif self.context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.context))
        self._opener = urllib.request.build_opener(*handlers)
        self.layout, self.fingerprint, self.max_images = self._read_layout()

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
              limit: int = MAX_ANSWER_BYTES) -> tuple[Any, bytes]:
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                data = response.read(limit + 1)
                answer_headers = response.headers  # looked up case-insensitively
        except urllib.error.HTTPError as e:
            raise click.ClickException(f"{self.url}{path}: HTTP {e.code}: {_error_text(e)}") from None
        except urllib.error.URLError as e:
            raise click.ClickException(f"{self.url}: cannot reach the server ({_reason(e.reason)})") from None
        except (TimeoutError, OSError) as e:
            raise click.ClickException(f"{self.url}: no answer ({_reason(e)})") from None
        if len(data) > limit:
            raise click.ClickException(f"{self.url}{path}: the answer is larger than {limit:,} bytes")
        return answer_headers, data

    def _read_layout(self) -> tuple[Manifest, str, int]:
        _, data = self._call("GET", "/v1/layout", limit=MAX_LAYOUT_BYTES)
        try:
            answer = json.loads(data)
            layout = Manifest.from_json(answer["layout"], source=f"{self.url}/v1/layout")
            fingerprint, max_images = answer["fingerprint"], int(answer["limits"]["max_images"])
        except FormatError:
            raise
        except (ValueError, KeyError, TypeError, RecursionError):
            raise click.ClickException(f"{self.url}/v1/layout: not a mist-cloud serve layout") from None
        if fingerprint != layout.layout_fingerprint():
            raise click.ClickException(f"{self.url}/v1/layout: the fingerprint {str(fingerprint)[:12]} does not "
                                       f"match the layout it came with ({layout.layout_fingerprint()[:12]})")
        return layout, fingerprint, max(1, max_images)

    def features(self, files: list[tuple[str, bytes]]) -> np.ndarray:
        """(name, bytes) image files -> (n, k, T, d) float32 sums, one multipart request."""
        body, content_type = multipart(files)
        headers, data = self._call("POST", "/v1/features", body, content_type)
        if headers.get(LAYOUT_HEADER) != self.fingerprint:
            raise click.ClickException(f"{self.url}: the answer's layout {str(headers.get(LAYOUT_HEADER))[:12]} is "
                                       f"not the one checked at the start ({self.fingerprint[:12]}); "
                                       "did the server restart with another backbone?")
        return decode_features(data, self.layout, len(files), self.url)


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body with one ``image`` file part per file, and its content type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, data in files:
        safe = os.path.basename(name).replace('"', "_").replace("\r", "_").replace("\n", "_")
        kind = mimetypes.guess_type(safe)[0] or "application/octet-stream"
        chunks += [f"--{boundary}\r\n".encode(),
                   f'Content-Disposition: form-data; name="image"; filename="{safe}"\r\n'.encode(),
                   f"Content-Type: {kind}\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def read_token(token_file: str | None) -> str | None:
    """The server's bearer token, by the rule the server applies (``mist.formats.served.read_token``)."""
    try:
        return served.read_token(token_file)
    except FormatError as e:
        raise click.ClickException(str(e)) from None


def check_server(server: RemoteBackbone, trained_on: Manifest, checkpoint: Path) -> None:
    """Refuse a server whose features differ from the checkpoint's training set, naming the field."""
    try:
        check_compatible(trained_on, server.layout, classes=False)
    except FormatError as e:
        detail = str(e).removeprefix("incompatible feature sets: ")
        raise click.ClickException(f"{server.url}: refusing the server, its layout does not match the "
                                   f"training set of {checkpoint}: {detail}") from None


def served_features(server: RemoteBackbone, images: list[str]) -> Iterator[tuple[list[str], np.ndarray]]:
    """``images`` sent in requests of at most the server's limit: each request's names and the sums answered."""
    for begin in range(0, len(images), server.max_images):
        names = images[begin:begin + server.max_images]
        files = []
        for name in names:
            try:
                files.append((name, Path(name).read_bytes()))
            except OSError as e:
                raise click.ClickException(f"{name}: {e.strerror or e.__class__.__name__}") from None
        yield names, server.features(files)


def predict_images(model: Any, classes: list[str], server: RemoteBackbone, images: list[str],
                   top_k: int) -> list[dict[str, Any]]:
    """Send ``images`` in requests of at most the server's limit; the adaptor runs here on the answers."""
    records = []
    for names, features in served_features(server, images):
        logits = model.forward(features.astype(model.dtype, copy=False), keep_cache=False)
        records += [{"image": name, **top} for name, top in zip(names, top_classes(logits, classes, top_k))]
    return records


def run(ckpt: Any, model: Any, checkpoint: Path, url: str, images: list[str], token: str | None,
        ca_cert: str | None, top_k: int, fmt: str, pins: tuple[str, ...] = ()) -> tuple[str, int]:
    """``predict --server``: check the server against the checkpoint, classify ``images``; (text, count)."""
    server = RemoteBackbone(url, token, ca_cert, pins=pins)
    check_server(server, training_layout(ckpt.feature_set, str(checkpoint)), checkpoint)
    records = predict_images(model, ckpt.classes, server, images, top_k)
    return format_predictions(records, ["image"], top_k, fmt), len(records)


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read(64 * 1024))["error"]).splitlines()[0]
    except Exception:  # not the server's JSON (a proxy's page, an empty body): the status line says enough
        return e.reason if isinstance(e.reason, str) else "error"


def _reason(reason: object) -> str:
    if isinstance(reason, PinMismatch):
        return str(reason.args[0])
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {reason.verify_message}; pass --ca-cert"
    if isinstance(reason, OSError):
        return reason.strerror or reason.__class__.__name__
    return str(reason)
