"""Ed25519 signatures on feature sets and adaptors, and the trust policy a reader applies to them.

A sha256 in a manifest catches an accident; it does not say who wrote the set, since whoever can replace a
shard can also rewrite its line in the manifest. A signature does: the cloud signs the manifest (which pins
every shard's sha256, the backbone's weights and the data config) with a secret key, and the device checks it
against the public keys it trusts before it reads a row. An adaptor is signed the same way, over the digest of
its tensors and metadata (formats/checkpoint.py). formats/SPEC.md §13 and docs/guarantees.md say what this
protects and what it does not.

Signing and checking need PyNaCl (libsodium), the optional extra ``mist-tuning[sign]``; everything else here,
and every reader that is not asked to check a signature, runs without it. Key files are text:

    mist-ed25519-secret <base64 of the 32-byte seed> <comment>      the secret key, mode 0600, one line
    mist-ed25519 <base64 of the 32-byte public key> <comment>        a public key; a file may hold several

A key's id is the first 16 hex digits of the sha256 of its 32 public bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FormatError

SCHEME = "ed25519"
SIGNATURE = "signature"  # the manifest field, and the checkpoint metadata key, that holds a signature
POLICIES = ("require", "when-present", "off")
DEFAULT_POLICY = "when-present"
PUBLIC_TAG, SECRET_TAG = "mist-ed25519", "mist-ed25519-secret"
# Domain separation: a signature over a manifest can never pass for one over an adaptor, or the other way round.
MANIFEST_DOMAIN = b"mist-feature-set-manifest/1\n"
ADAPTOR_DOMAIN = b"mist-adaptor/1\n"
INSTALL_HINT = "pip install 'mist-tuning[sign]'"
MAX_KEY_FILE_BYTES = 1 << 20
_UNSIGNED_HINT = {"feature set": " (sign it where it was made: mist-cloud sign SET --key KEY)",
                  "adaptor": " (export it signed: mist-device export RUN OUT --sign-key KEY)"}


class SignatureError(FormatError):
    """A signature is missing, malformed, by an untrusted key or does not match; or a key file is bad."""


def _nacl_signing():
    try:
        import nacl.exceptions
        import nacl.signing
    except ImportError:
        raise SignatureError(f"signatures need PyNaCl, which is not installed: {INSTALL_HINT}") from None
    return nacl.signing, nacl.exceptions


def canonical_json(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, ASCII, no NaN. The writer and every reader make the
    same bytes from the same JSON value, whatever the file's whitespace or key order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_message(manifest_json: dict[str, Any]) -> bytes:
    """What a set's signature signs: the whole manifest but its ``signature`` field, canonically encoded."""
    return MANIFEST_DOMAIN + canonical_json({k: v for k, v in manifest_json.items() if k != SIGNATURE})


# ---- keys -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKey:
    raw: bytes  # 32 bytes
    comment: str = ""
    source: str = ""  # the file it came from, for messages

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def line(self) -> str:
        return f"{PUBLIC_TAG} {base64.b64encode(self.raw).decode()} {self.comment}".rstrip() + "\n"


@dataclass(frozen=True)
class SigningKey:
    seed: bytes  # 32 bytes: Ed25519's secret
    public: PublicKey

    def sign(self, message: bytes) -> dict[str, str]:
        """The signature field for ``message``: scheme, the key's id, and the 64-byte signature in base64."""
        signing, _ = _nacl_signing()
        value = signing.SigningKey(self.seed).sign(message).signature
        return {"scheme": SCHEME, "key_id": self.public.key_id, "value": base64.b64encode(value).decode()}


def generate_key(comment: str = "") -> SigningKey:
    signing, _ = _nacl_signing()
    secret = signing.SigningKey.generate()
    return SigningKey(bytes(secret), PublicKey(bytes(secret.verify_key), _one_word(comment)))


def _one_word(comment: str) -> str:
    return "".join(c if c.isprintable() and not c.isspace() else "_" for c in comment)[:64]


def write_key_pair(path: str | os.PathLike, key: SigningKey) -> tuple[Path, Path]:
    """``path`` (the secret key, created 0600) and ``path.pub``; neither may exist already."""
    secret, public = Path(path), Path(str(path) + ".pub")
    for target in (secret, public):
        if target.exists() or target.is_symlink():
            raise SignatureError(f"{target}: already exists; a key is never overwritten (choose another name)")
    line = f"{SECRET_TAG} {base64.b64encode(key.seed).decode()} {key.public.comment}".rstrip() + "\n"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    try:
        fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(key.public.line())
    except BaseException:
        secret.unlink(missing_ok=True)
        raise
    return secret, public


def _key_lines(path: Path) -> list[tuple[int, list[str]]]:
    from .safetensors_check import open_regular

    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_KEY_FILE_BYTES:
                raise SignatureError(f"{path}: over {MAX_KEY_FILE_BYTES:,} bytes; not a key file")
            raw = f.read()
    except OSError as e:
        raise SignatureError(f"{path}: unreadable key file ({e.strerror or e.__class__.__name__})") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SignatureError(f"{path}: not a mist key file (not ASCII text)") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _decode_32(text: str, path: Path, n: int) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise SignatureError(f"{path}: line {n}: the key is not 32 bytes of base64")
    return raw


def read_signing_key(path: str | os.PathLike) -> SigningKey:
    """The secret key in ``path`` (as ``keygen`` wrote it)."""
    path = Path(path)
    lines = _key_lines(path)
    if len(lines) != 1 or lines[0][1][0] != SECRET_TAG or len(lines[0][1]) < 2:
        hint = " (that is a public key; sign with the secret one)" if lines and lines[0][1][0] == PUBLIC_TAG else ""
        raise SignatureError(f"{path}: not a mist secret key{hint}")
    n, words = lines[0]
    seed = _decode_32(words[1], path, n)
    signing, _ = _nacl_signing()
    public = bytes(signing.SigningKey(seed).verify_key)
    return SigningKey(seed, PublicKey(public, words[2] if len(words) > 2 else "", str(path)))


def read_public_keys(paths: Iterable[str | os.PathLike]) -> tuple[PublicKey, ...]:
    """Every public key in ``paths``: files of ``mist-ed25519`` lines, or folders of ``*.pub`` such files."""
    keys: dict[str, PublicKey] = {}
    for given in paths:
        path = Path(given)
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise SignatureError(f"{path}: a trusted-key folder holds no *.pub file")
        for file in files:
            lines = _key_lines(file)
            if not lines:
                raise SignatureError(f"{file}: holds no public key")
            for n, words in lines:
                if words[0] != PUBLIC_TAG or len(words) < 2:
                    secret = " (a secret key: trust its .pub file, and keep this one off the device)"
                    raise SignatureError(f"{file}: line {n}: not a mist public key"
                                         + (secret if words[0] == SECRET_TAG else ""))
                key = PublicKey(_decode_32(words[1], file, n), words[2] if len(words) > 2 else "", str(file))
                keys.setdefault(key.key_id, key)
    return tuple(keys.values())


# ---- the policy -------------------------------------------------------------------------------------------


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


@dataclass(frozen=True)
class Trust:
    """What a reader does with signatures: ``require`` a valid one by a trusted key, check one ``when-present``
    (an unsigned file passes, with a warning once keys are configured), or ``off``."""

    policy: str = DEFAULT_POLICY
    keys: tuple[PublicKey, ...] = ()
    warn: Callable[[str], None] = _stderr
    checked: dict[str, str] = field(default_factory=dict, compare=False)  # where -> the key id that signed it

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"signature policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "require" and not self.keys:
            raise SignatureError("--signatures require needs at least one trusted public key "
                                 "(--trusted-key FILE or $MIST_TRUSTED_KEYS)")

    @property
    def hashes_shards(self) -> bool:
        """Whether a reader must hash every shard: under ``require`` a signature vouches for the rows only
        through the checksums it pins."""
        return self.policy == "require"

    def check(self, signature: Any, message: bytes, what: str, where: str) -> str | None:
        """Apply the policy to ``signature`` (the parsed field, or None when absent) over ``message``.

        Returns the id of the key that signed it, or None when nothing was checked; raises SignatureError with
        one line that names ``where`` when the policy refuses."""
        if self.policy == "off":
            return None
        if signature is None:
            if self.policy == "require":
                raise SignatureError(f"{where}: unsigned {what}, refused under --signatures require"
                                     f"{_UNSIGNED_HINT.get(what, '')}")
            if self.keys:
                self.warn(f"warning: {where}: unsigned {what}; accepted under --signatures when-present")
            return None
        key_id, value = _parse_signature(signature, where)
        if not self.keys:
            self.warn(f"warning: {where}: signed by key {key_id}, but no trusted key is configured "
                      "(--trusted-key, $MIST_TRUSTED_KEYS); the signature was not checked")
            return None
        key = next((k for k in self.keys if k.key_id == key_id), None)
        if key is None:
            trusted = ", ".join(k.key_id for k in self.keys)
            raise SignatureError(f"{where}: signed by key {key_id}, which is not a trusted key (trusted: {trusted})")
        signing, exceptions = _nacl_signing()
        try:
            signing.VerifyKey(key.raw).verify(message, value)
        except (exceptions.BadSignatureError, ValueError):
            raise SignatureError(f"{where}: the signature by key {key_id} does not match the {what} "
                                 "(modified after it was signed)") from None
        self.checked[where] = key_id
        return key_id


def _parse_signature(signature: Any, where: str) -> tuple[str, bytes]:
    if not isinstance(signature, dict) or signature.get("scheme") != SCHEME:
        raise SignatureError(f"{where}: malformed signature (expected an {SCHEME} signature object)")
    key_id, value = signature.get("key_id"), signature.get("value")
    if not isinstance(key_id, str) or len(key_id) != 16 or not isinstance(value, str):
        raise SignatureError(f"{where}: malformed signature (key_id or value)")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        raise SignatureError(f"{where}: malformed signature (the value is not 64 bytes of base64)")
    return key_id, raw
