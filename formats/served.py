"""Features over HTTP: the bytes ``mist-cloud serve`` answers and ``mist-device predict --server`` reads.

A response body is a safetensors file shaped like a feature-set shard: ``features`` (n, k, T, d) in the
served layout's storage dtype (int8/int4: the codes with their ``scales``, exactly as a shard stores them),
``labels`` (n,) all -1 (the server knows no labels), and ``ids`` (n,), the position of each image in the
request. Its metadata and the ``X-Mist-Layout`` response header carry the layout fingerprint of the served
layout (``GET /v1/layout``), so a client that checked the layout once can tell when a server behind the same
URL changed.

Encoding and decoding are one function each, so a new storage dtype changes them and nothing else. The bearer
token follows one rule on both sides, ``read_token``: a client token the server would refuse can never work.
So does the TLS certificate pin (``certificate_pin``, ``parse_pin``): the server prints the pin of its
certificate, and a device given ``--server-pin`` refuses any other certificate before it sends a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from .errors import FormatError
from .feature_set import IDS, LABELS
from .manifest import Manifest
from .quant import SCALES, bad_scale, is_quantised, stored_shapes
from .quant import decode_features as decode_stored
from .quant import encode_features as encode_stored

SHARD_FORMAT = "mist-feature-shard"
LAYOUT_HEADER = "X-Mist-Layout"
MEDIA_TYPE = "application/vnd.mist.features+safetensors"
SERVED_SPLIT = "serve"  # the split and dataset of a served layout: it describes no stored images
TOKEN_ENV = "MIST_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16


def served_layout(manifest: Manifest) -> Manifest:
    """The layout a server answers with: the backbone, groups, tokens and data config of ``manifest``,
    no classes, no dataset and no shards."""
    return Manifest(
        backbone=dict(manifest.backbone), groups=[list(g) for g in manifest.groups], scale=manifest.scale,
        tokens=manifest.tokens, prefix_tokens=manifest.prefix_tokens, grid=manifest.grid, dim=manifest.dim,
        pool=manifest.pool, dtype=manifest.dtype, data_config=dict(manifest.data_config), classes=[],
        split=SERVED_SPLIT, dataset={"source": SERVED_SPLIT}, layer_names=list(manifest.layer_names),
    )


def encode_features(features: np.ndarray, layout: Manifest) -> bytes:
    """(n, k, T, d) sums -> the safetensors bytes of one response, in ``layout``'s storage dtype."""
    n = len(features)
    if features.shape[1:] != layout.row_shape:
        raise ValueError(f"features of shape {features.shape[1:]} do not fit the layout's {layout.row_shape}")
    if is_quantised(layout.dtype):
        features = np.asarray(features, dtype=np.float32)  # quantised from the fp32 sums, as extract does
    tensors = {
        # safetensors writes a non-contiguous array's bytes wrongly, without a warning (encode_stored copies).
        **encode_stored(features, layout.dtype),
        LABELS: np.full(n, -1, dtype="<i8"),
        IDS: np.arange(n, dtype="<i8"),
    }
    metadata = {"format": SHARD_FORMAT, "set_layout": layout.layout_fingerprint(), "shard_index": "0"}
    return save(tensors, metadata=metadata)


def decode_features(body: bytes, layout: Manifest, images: int, source: str) -> np.ndarray:
    """A response body -> (images, k, T, d) float32 features, refusing anything that does not fit ``layout``.

    ``source`` names the server in the one-line error.
    """
    try:
        (header_len,) = struct.unpack("<Q", body[:8])
        header = json.loads(body[8:8 + header_len].decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        tensors = load(body)
    except (struct.error, ValueError, UnicodeDecodeError, AttributeError, SafetensorError, RecursionError):
        raise FormatError(f"{source}: the response is not a safetensors feature shard") from None
    if not isinstance(metadata, dict) or metadata.get("format") != SHARD_FORMAT:
        raise FormatError(f"{source}: the response is not a mist feature shard")
    if metadata.get("set_layout") != layout.layout_fingerprint():
        raise FormatError(f"{source}: the response's layout fingerprint {str(metadata.get('set_layout'))[:12]} "
                          f"is not the layout the server announced ({layout.layout_fingerprint()[:12]})")
    for name, (dtype, shape) in stored_shapes(layout.dtype, images, layout.row_shape).items():
        got = tensors.get(name)
        if got is None or got.dtype != dtype or got.shape != shape:
            found = "none" if got is None else f"{got.dtype} {got.shape}"
            raise FormatError(f"{source}: response tensor '{name}' is {found}, expected {dtype} {shape} "
                              f"({layout.dtype})")
    if is_quantised(layout.dtype):
        bad = bad_scale(tensors[SCALES])
        if bad is not None:
            raise FormatError(f"{source}: the response holds a {bad[1]} scale (image {bad[0][0]})")
    ids = tensors.get(IDS)
    if ids is None or not np.array_equal(ids, np.arange(images)):
        raise FormatError(f"{source}: response ids are not the request's images in order")
    stored = {name: tensors[name] for name in stored_shapes(layout.dtype, images, layout.row_shape)}
    out = decode_stored(stored, layout.dtype, layout.row_shape)
    if not np.all(np.isfinite(out)):
        raise FormatError(f"{source}: the response holds non-finite features")
    return out


def read_token(token_file: str | None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$MIST_SERVE_TOKEN``, else None (no token).

    ``mist-cloud serve`` and ``mist-device predict --server`` both read it here. A token must be at least 16
    printable ASCII characters without spaces; anything else raises FormatError with one line that names
    ``--token-file F`` or ``$MIST_SERVE_TOKEN``, for each side to turn into its own CLI error.
    """
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"--token-file {token_file}: unreadable ({getattr(e, 'strerror', None) or e})") from None
        where, token = f"--token-file {token_file}", (text.splitlines() or [""])[0].strip()
    elif os.environ.get(TOKEN_ENV) is not None:
        where, token = f"${TOKEN_ENV}", os.environ[TOKEN_ENV].strip()
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise FormatError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} characters "
                          "(e.g. `openssl rand -hex 32`)")
    if not all(33 <= ord(c) < 127 for c in token):
        raise FormatError(f"{where}: the token must be printable ASCII without spaces")
    return token


# ---- TLS certificate pins ----------------------------------------------------------------------------------

PIN_PREFIX = "sha256:"
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def der_pin(der: bytes) -> str:
    """The pin of a certificate: ``sha256:`` and the hex sha256 of its DER bytes, as
    ``openssl x509 -noout -fingerprint -sha256`` prints it (there in upper case with colons)."""
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


def certificate_pin(cert_file: str) -> str:
    """The pin of the first certificate in the PEM file ``cert_file`` (the server's own, in a chain file)."""
    import ssl

    try:
        with open(cert_file, encoding="ascii", errors="replace") as f:
            found = _PEM_CERT.search(f.read())
        if found is None:
            raise ValueError("no PEM certificate")
        return der_pin(ssl.PEM_cert_to_DER_cert(found.group(0)))
    except (OSError, ValueError) as e:
        raise FormatError(f"{cert_file}: cannot read a PEM certificate ({getattr(e, 'strerror', None) or e})") from None


def parse_pin(text: str) -> str:
    """A pin as a user may paste it: ``sha256:HEX``, bare hex, or openssl's ``AB:CD:...``; in canonical form.
    Raises ValueError for anything else."""
    value = text.strip()
    value = value[len(PIN_PREFIX):] if value.lower().startswith(PIN_PREFIX) else value
    value = value.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"{text!r} is not a sha256 certificate pin (sha256: and 64 hex digits)")
    return PIN_PREFIX + value
