"""Ship a feature set between folders (a USB stick, an SD card) and object storage (``s3://bucket/prefix``).

One copy routine serves ``mist-cloud push`` and ``mist-device pull``, in either direction:

- **verified**: each shard's sha256 is computed while its bytes stream from the source, and the shard is
  committed at the destination only when it matches the manifest;
- **resumable**: a shard already at the destination is hashed and skipped when it matches; a partial one
  (a ``*.tmp`` file, an unfinished multipart upload) is never taken for a whole one;
- **atomic**: the manifest goes last, so a half-copied set has no manifest and reads as incomplete;
- **USB-safe**: names are checked against FAT32/exFAT's rules, every file and the directory are fsynced.

boto3 is imported only when an ``s3://`` URL is used, so the base install (numpy, click, safetensors) ships
between folders without it. The manifest travels byte for byte, so a shipped set is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import TMP_SUFFIX, atomic_write_bytes, fsync_dir
from .errors import FormatError
from .manifest import MANIFEST_NAME, Manifest

CHUNK = 4 << 20  # bytes per read while streaming
DEFAULT_PART_SIZE = 64 << 20  # multipart upload above this; S3 wants parts of 5 MiB to 5 GiB
MIN_PART_SIZE = 5 << 20
FAT32_MAX_FILE = (4 << 30) - 1  # FAT32 stores a file's size in 32 bits
MAX_SHARD_BYTES = 1 << 30  # what `extract` aims for: well under FAT32's limit, and a cheap shard to redo
SHA_METADATA = "mist-sha256"  # user metadata on each uploaded shard: the manifest's checksum for it
S3_EXTRA = "pip install 'mist-tuning[s3]'"
ENDPOINT_ENV = "MIST_S3_ENDPOINT_URL"
DOWNLOAD_ATTEMPTS = 3  # a dropped download stream restarts its shard, this many times at most


class ShipError(FormatError):
    """A copy cannot go on: unreachable store, refused credentials, full or read-only destination, bad shard.

    A FormatError, so both CLIs print it as their one-line error. ``transient`` marks a dropped connection
    that a retry may cure.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


# ---- names and sizes ----------------------------------------------------------------------------------------

_FAT_FORBIDDEN = re.compile(r'[\x00-\x1f"*/:<>?\\|]')
_DOS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def fat_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file name on FAT32/exFAT, or None when it can."""
    if not name or name in (".", ".."):
        return "is empty or a dot name"
    if _FAT_FORBIDDEN.search(name):
        return 'holds a character FAT forbids (control characters and "*/:<>?\\|)'
    if name[-1] in ". ":
        return "ends in a dot or a space, which FAT drops"
    if len(name) > 255:
        return "is longer than FAT's 255 characters"
    if name.split(".")[0].upper() in _DOS_DEVICES:
        return "is a reserved DOS device name"
    return None


def capped_shard_rows(shard_rows: int, row_bytes: int, multiple: int = 1, max_bytes: int = MAX_SHARD_BYTES) -> int:
    """``shard_rows``, lowered so a shard's data stays under ``max_bytes``; a multiple of ``multiple``.

    Never below ``multiple`` rows: one batch per shard is the floor, whatever its size.
    """
    fit = max(max_bytes // max(row_bytes, 1), 1)
    if shard_rows <= fit:
        return shard_rows
    return max(fit // multiple, 1) * multiple


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ---- stores -----------------------------------------------------------------------------------------------


class LocalStore:
    """A feature-set directory on a local filesystem (a mounted USB stick counts)."""

    is_local = True

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def where(self, name: str | None = None) -> str:
        return str(self.root if name is None else self.root / name)

    def read_small(self, name: str) -> bytes | None:
        path = self.root / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ShipError(f"{path}: {e.strerror or e}") from None

    def sizes(self) -> dict[str, int]:
        try:
            return {p.name: p.stat().st_size for p in self.root.iterdir() if p.is_file()}
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ShipError(f"{self.root}: {e.strerror or e}") from None

    def chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes]:
        path = self.root / name
        try:
            with open(path, "rb") as f:
                while block := f.read(size):
                    yield block
        except OSError as e:
            raise ShipError(f"{path}: {e.strerror or e}") from None

    def write(self, name: str, chunks: Iterable[bytes], check: Callable[[], None], sha256: str, size: int) -> None:
        """Write to ``name.tmp``, fsync, ``check()`` the streamed checksum, rename, fsync the directory."""
        path = self.root / name
        tmp = path.with_name(name + TMP_SUFFIX)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                for block in chunks:
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            check()
            os.replace(tmp, path)
            fsync_dir(self.root)
        except OSError as e:
            _unlink_quietly(tmp)
            raise ShipError(f"{e.filename or tmp}: {e.strerror or e} (writing {name})") from None
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def write_manifest(self, data: bytes) -> None:
        try:
            atomic_write_bytes(self.root / MANIFEST_NAME, data)
        except OSError as e:
            raise ShipError(f"{self.root / MANIFEST_NAME}: {e.strerror or e}") from None

    def delete(self, name: str) -> None:
        try:
            (self.root / name).unlink(missing_ok=True)
            fsync_dir(self.root)
        except OSError as e:
            raise ShipError(f"{self.root / name}: {e.strerror or e}") from None

    def check_room(self, needed: int, largest: int) -> None:
        """Fail before copying when the destination cannot hold the set (free space, FAT32's file limit)."""
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            return
        if needed > free:
            raise ShipError(f"{self.root}: needs {_human(needed)} more but only {_human(free)} are free")
        if largest > FAT32_MAX_FILE and _filesystem_type(probe) in ("vfat", "msdos"):
            raise ShipError(f"{self.root}: is on FAT32, whose files stop at 4 GiB, and a shard holds "
                            f"{_human(largest)}; re-extract with smaller --shard-rows or use exFAT")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem mounted at the longest mount point above ``path`` (Linux only)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best = str(path.resolve()), (None, -1)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > best[1]:
            best = (parts[2], len(mount))
    return best[0]


class S3Store:
    """A feature set stored as objects ``PREFIX/manifest.json``, ``PREFIX/shard-NNNNN.safetensors``."""

    is_local = False

    def __init__(self, bucket: str, prefix: str, client: Any, part_size: int = DEFAULT_PART_SIZE):
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client
        self.part_size = max(part_size, MIN_PART_SIZE)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str | None = None) -> str:
        key = self.prefix if name is None else self.key(name)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def _call(self, where: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except Exception as e:
            raise _s3_error(e, where, self.bucket) from None

    def read_small(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
        except Exception as e:
            if _error_code(e) == "NoSuchKey":
                return None
            if _error_code(e) == "404":  # S3 names a missing key; a bare 404 came from something else
                raise ShipError(f"{self.where(name)}: the endpoint answered 404 without an S3 error; "
                                f"is it an S3 store? (check --endpoint-url / {ENDPOINT_ENV})") from None
            raise _s3_error(e, self.where(name), self.bucket) from None

    def list_keys(self, under: str) -> dict[str, int]:
        """Every key below ``under`` (a key prefix) with its size."""
        found: dict[str, int] = {}
        token: dict[str, str] = {}
        while True:
            page = self._call(self.where(), "list_objects_v2", Prefix=under, **token)
            for item in page.get("Contents", []):
                found[item["Key"]] = int(item["Size"])
            if not page.get("IsTruncated"):
                return found
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def sizes(self) -> dict[str, int]:
        base = self.key("")
        return {k[len(base):]: n for k, n in self.list_keys(base).items() if "/" not in k[len(base):]}

    def chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes]:
        where = self.where(name)
        body = self._call(where, "get_object", Key=self.key(name))["Body"]
        try:
            yield from body.iter_chunks(size)
        except Exception as e:
            raise _s3_error(e, where, self.bucket) from None
        finally:
            body.close()

    def write(self, name: str, chunks: Iterable[bytes], check: Callable[[], None], sha256: str, size: int) -> None:
        """One PUT up to the part size, else a multipart upload; either is committed only after ``check()``.

        botocore retries each request (and so each part) with backoff; an aborted upload leaves no object.
        """
        where, key, meta = self.where(name), self.key(name), {SHA_METADATA: sha256}
        if size <= self.part_size:
            body = b"".join(chunks)
            check()
            self._call(where, "put_object", Key=key, Body=body, Metadata=meta)
            return
        upload = self._call(where, "create_multipart_upload", Key=key, Metadata=meta)["UploadId"]
        try:
            parts = []
            for number, part in enumerate(_regroup(chunks, self.part_size), 1):
                etag = self._call(where, "upload_part", Key=key, UploadId=upload, PartNumber=number,
                                  Body=part)["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
            check()
            self._call(where, "complete_multipart_upload", Key=key, UploadId=upload,
                       MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            except Exception:
                pass  # the store's lifecycle rules reap it; it never became an object
            raise

    def write_manifest(self, data: bytes) -> None:
        self._call(self.where(MANIFEST_NAME), "put_object", Key=self.key(MANIFEST_NAME), Body=data,
                   ContentType="application/json")

    def delete(self, name: str) -> None:
        self._call(self.where(name), "delete_object", Key=self.key(name))

    def check_room(self, needed: int, largest: int) -> None:
        pass  # a bucket has no free-space figure to ask for


def _regroup(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Chunks of any size in, pieces of exactly ``size`` bytes out (the last may be shorter)."""
    held, count = [], 0
    for block in chunks:
        held.append(block)
        count += len(block)
        while count >= size:
            joined = b"".join(held)
            yield joined[:size]
            held, count = [joined[size:]], count - size
    if count:
        yield b"".join(held)


def _error_code(e: Exception) -> str:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _s3_error(e: Exception, where: str, bucket: str) -> ShipError:
    """botocore's exceptions, as one line that names the object and says what to do."""
    import botocore.exceptions as bx

    if isinstance(e, ShipError):
        return e
    if isinstance(e, bx.NoCredentialsError):
        return ShipError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                         "AWS_PROFILE, or ~/.aws/credentials)")
    if isinstance(e, bx.ProfileNotFound):
        return ShipError(f"{where}: {e}")
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return ShipError(f"{where}: cannot reach the object store ({e}); check --endpoint-url / {ENDPOINT_ENV}")
    if isinstance(e, (bx.ReadTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError,
                      bx.ConnectionClosedError)):
        return ShipError(f"{where}: the connection dropped ({e.__class__.__name__})", transient=True)
    code = _error_code(e)
    if code == "NoSuchBucket":
        return ShipError(f"s3://{bucket}: no such bucket (create it first, or check the name and the endpoint)")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                "ExpiredToken"):
        return ShipError(f"{where}: access denied by the object store ({code}); check the AWS credentials")
    if code in ("NoSuchKey", "404"):
        return ShipError(f"{where}: no such object")
    if isinstance(e, bx.ClientError):
        return ShipError(f"{where}: the object store refused the request ({code or e})")
    if isinstance(e, bx.BotoCoreError):
        return ShipError(f"{where}: {e}")
    raise e


def s3_client(endpoint_url: str | None = None, where: str = "s3://") -> Any:
    """A boto3 S3 client: credentials the standard AWS way, bounded timeouts, retries with backoff."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ShipError(f"{where}: s3:// URLs need the [s3] extra: {S3_EXTRA}") from None
    import botocore.exceptions as bx

    endpoint_url = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                    s3={"addressing_style": "path" if endpoint_url else "auto"})
    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
    except bx.ProfileNotFound as e:
        raise ShipError(f"{where}: {e}") from None
    except ValueError as e:  # a malformed endpoint URL
        raise ShipError(f"{where}: bad endpoint URL {endpoint_url!r} ({e})") from None


def is_url(text: str) -> bool:
    return "://" in text


def open_store(text: str, endpoint_url: str | None = None, part_size: int = DEFAULT_PART_SIZE,
               ) -> LocalStore | S3Store:
    """A folder path or an ``s3://bucket/prefix`` URL."""
    if not is_url(text):
        return LocalStore(text)
    scheme, _, rest = text.partition("://")
    if scheme != "s3":
        raise ShipError(f"{text}: only local paths and s3://bucket/prefix URLs are supported")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ShipError(f"{text}: the URL names no bucket (s3://bucket/prefix)")
    return S3Store(bucket, prefix, s3_client(endpoint_url, text), part_size=part_size)


# ---- progress ---------------------------------------------------------------------------------------------


class Progress:
    """What a copy reports as it goes; this base class reports nothing (see ship_progress for renderers)."""

    def begin(self, shards: int, total_bytes: int) -> None: ...

    def shard_begin(self, name: str, size: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def shard_end(self, name: str, status: str, nbytes: int, seconds: float) -> None: ...

    def end(self) -> None: ...


@dataclass
class ShardResult:
    file: str
    bytes: int
    status: str  # "copied", "skipped" (already at the destination and verified) or "verified"
    seconds: float


@dataclass
class Report:
    source: str
    destination: str
    rows: int
    shards: list[ShardResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_total(self) -> int:
        return sum(s.bytes for s in self.shards)

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.shards)

    def bytes_with(self, status: str) -> int:
        return sum(s.bytes for s in self.shards if s.status == status)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "rows": self.rows,
                "shards": [vars(s) for s in self.shards], "bytes": self.bytes_total,
                "bytes_copied": self.bytes_with("copied"), "bytes_skipped": self.bytes_with("skipped"),
                "seconds": round(self.seconds, 6),
                "bytes_per_s": round(self.bytes_total / self.seconds, 1) if self.seconds > 0 else None,
                "verified": True}


# ---- copy, verify, list -----------------------------------------------------------------------------------


class _Throttle:
    """Sleep so that at most ``rate`` bytes per second flow (None: no limit)."""

    def __init__(self, rate: float | None):
        self.rate, self.sent, self.start = rate, 0, time.perf_counter()

    def __call__(self, nbytes: int) -> None:
        if not self.rate:
            return
        self.sent += nbytes
        ahead = self.sent / self.rate - (time.perf_counter() - self.start)
        if ahead > 0:
            time.sleep(ahead)


def _load_manifest(store: LocalStore | S3Store) -> tuple[bytes, Manifest]:
    where = store.where(MANIFEST_NAME)
    data = store.read_small(MANIFEST_NAME)
    if data is None:
        raise ShipError(f"{where}: missing manifest (is this a feature set? a half-copied one has none yet)")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise ShipError(f"{where}: manifest is not valid JSON") from None
    return data, Manifest.from_json(obj, source=where)


def _check_names(manifest: Manifest, where: str) -> None:
    seen: dict[str, str] = {}
    for shard in manifest.shards:
        problem = fat_name_problem(shard.file)
        if problem:
            raise ShipError(f"{where}: shard name {shard.file!r} {problem}; it cannot live on a USB stick")
        folded = shard.file.casefold()
        if folded in seen:  # FAT and exFAT do not tell case apart
            raise ShipError(f"{where}: shards {seen[folded]!r} and {shard.file!r} differ only in case")
        seen[folded] = shard.file


def _hash_stream(chunks: Iterable[bytes], digest: Any, progress: Progress, throttle: _Throttle,
                 ) -> Iterator[bytes]:
    for block in chunks:
        digest.update(block)
        progress.advance(len(block))
        throttle(len(block))
        yield block


def _matches(store: LocalStore | S3Store, name: str, sha256: str, progress: Progress, throttle: _Throttle,
             ) -> bool:
    digest = hashlib.sha256()
    for _ in _hash_stream(store.chunks(name), digest, progress, throttle):
        pass
    return digest.hexdigest() == sha256


def _same_set(a: Manifest, b: Manifest) -> bool:
    return a.layout_fingerprint() == b.layout_fingerprint() and a.shards == b.shards


def copy_set(src: LocalStore | S3Store, dst: LocalStore | S3Store, progress: Progress | None = None,
             overwrite: bool = False, max_rate: float | None = None) -> Report:
    """Copy the complete feature set at ``src`` to ``dst``, shard by shard, manifest last."""
    progress = progress or Progress()
    if src.is_local and dst.is_local and Path(src.where()).resolve() == Path(dst.where()).resolve():
        raise ShipError(f"{dst.where()}: source and destination are the same folder")
    manifest_bytes, manifest = _load_manifest(src)
    if not manifest.complete:
        raise ShipError(f"{src.where(MANIFEST_NAME)}: the set is incomplete ({manifest.rows} rows so far); "
                        "finish the extraction before shipping it")
    _check_names(manifest, src.where(MANIFEST_NAME))
    src_sizes = src.sizes()
    for shard in manifest.shards:
        if shard.file not in src_sizes:
            raise ShipError(f"{src.where(shard.file)}: missing (the manifest lists it)")

    existing = dst.read_small(MANIFEST_NAME)
    if existing is not None and existing != manifest_bytes:
        try:
            other = Manifest.from_json(json.loads(existing), source=dst.where(MANIFEST_NAME))
        except (FormatError, ValueError, RecursionError):
            other = None
        if other is None or not _same_set(other, manifest):
            if not overwrite:
                raise ShipError(f"{dst.where(MANIFEST_NAME)}: the destination holds a different feature set; "
                                "choose another destination or pass --overwrite")
            dst.delete(MANIFEST_NAME)  # from here on the destination reads as incomplete until the end
    dst_sizes = dst.sizes()
    needed = sum(src_sizes[s.file] for s in manifest.shards if dst_sizes.get(s.file) != src_sizes[s.file])
    dst.check_room(needed, max(src_sizes[s.file] for s in manifest.shards) if manifest.shards else 0)

    report = Report(src.where(), dst.where(), manifest.rows)
    throttle = _Throttle(max_rate)
    chunk = CHUNK if not max_rate else int(min(CHUNK, max(max_rate / 10, 64 << 10)))
    progress.begin(len(manifest.shards), sum(src_sizes[s.file] for s in manifest.shards))
    start = time.perf_counter()
    for shard in manifest.shards:
        size = src_sizes[shard.file]
        began = time.perf_counter()
        progress.shard_begin(shard.file, size)
        if dst_sizes.get(shard.file) == size and _matches(dst, shard.file, shard.sha256, progress, _Throttle(None)):
            status = "skipped"
        else:
            _copy_shard(src, dst, shard.file, shard.sha256, size, progress, throttle, chunk)
            status = "copied"
        report.shards.append(ShardResult(shard.file, size, status, time.perf_counter() - began))
        progress.shard_end(shard.file, status, size, time.perf_counter() - began)
    dst.write_manifest(manifest_bytes)
    report.seconds = time.perf_counter() - start
    progress.end()
    return report


def _copy_shard(src: LocalStore | S3Store, dst: LocalStore | S3Store, name: str, sha256: str, size: int,
                progress: Progress, throttle: _Throttle, chunk: int) -> None:
    for attempt in range(DOWNLOAD_ATTEMPTS):
        digest = hashlib.sha256()

        def check(digest: Any = digest) -> None:
            if digest.hexdigest() != sha256:
                raise ShipError(f"{src.where(name)}: checksum mismatch (the source is corrupt or was modified); "
                                "nothing was written for it")

        try:
            dst.write(name, _hash_stream(src.chunks(name, chunk), digest, progress, throttle), check, sha256, size)
            return
        except ShipError as e:
            if not e.transient or attempt == DOWNLOAD_ATTEMPTS - 1:
                raise
            time.sleep(2 ** attempt)


def verify_set(store: LocalStore | S3Store, progress: Progress | None = None) -> Report:
    """Hash every shard at ``store`` against its manifest, streaming; raise naming the first bad one."""
    progress = progress or Progress()
    _, manifest = _load_manifest(store)
    if not manifest.complete:
        raise ShipError(f"{store.where(MANIFEST_NAME)}: incomplete feature set ({manifest.rows} rows in "
                        f"{len(manifest.shards)} shards so far)")
    sizes = store.sizes()
    for shard in manifest.shards:
        if shard.file not in sizes:
            raise ShipError(f"{store.where(shard.file)}: missing (the manifest lists it)")
    report = Report(store.where(), store.where(), manifest.rows)
    progress.begin(len(manifest.shards), sum(sizes[s.file] for s in manifest.shards))
    start = time.perf_counter()
    for shard in manifest.shards:
        began = time.perf_counter()
        progress.shard_begin(shard.file, sizes[shard.file])
        if not _matches(store, shard.file, shard.sha256, progress, _Throttle(None)):
            raise ShipError(f"{store.where(shard.file)}: checksum mismatch (the shard is corrupt or was modified "
                            "after it was written)")
        report.shards.append(ShardResult(shard.file, sizes[shard.file], "verified", time.perf_counter() - began))
        progress.shard_end(shard.file, "verified", sizes[shard.file], time.perf_counter() - began)
    report.seconds = time.perf_counter() - start
    progress.end()
    return report


@dataclass
class SetListing:
    location: str
    backbone: str
    groups: str
    rows: int
    bytes: int
    status: str  # "complete", or "incomplete: why", or "unreadable: why"

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def _describe(location: str, manifest_bytes: bytes | None, files: dict[str, int], manifest_where: str,
              ) -> SetListing:
    shard_files = {n: s for n, s in files.items() if n.startswith("shard-") and not n.endswith(TMP_SUFFIX)}
    if manifest_bytes is None:
        return SetListing(location, "?", "?", 0, sum(shard_files.values()),
                          f"incomplete: no manifest yet ({len(shard_files)} shard files)")
    try:
        m = Manifest.from_json(json.loads(manifest_bytes), source=manifest_where)
    except (FormatError, ValueError, RecursionError) as e:
        return SetListing(location, "?", "?", 0, sum(shard_files.values()), f"unreadable: {e}")
    groups = " | ".join(",".join(map(str, g)) if len(g) <= 2 else f"{g[0]}-{g[-1]}" for g in m.groups)
    missing = [s.file for s in m.shards if s.file not in files]
    listed_bytes = sum(files.get(s.file, 0) for s in m.shards)
    if not m.complete:
        status = "incomplete: still being written"
    elif missing:
        status = f"incomplete: {len(missing)} of {len(m.shards)} shards missing"
    else:
        status = "complete"
    return SetListing(location, m.backbone.get("name", "?"), f"k={m.k} [{groups}]", m.rows, listed_bytes, status)


def list_sets(store: LocalStore | S3Store, depth: int = 3) -> list[SetListing]:
    """Feature sets at or below ``store`` (a set is a folder with a manifest or shard files).

    ``complete`` here means the manifest says so and every shard it lists is present; it does not hash
    (``verify`` does).
    """
    if isinstance(store, LocalStore):
        if not store.root.is_dir():
            raise ShipError(f"{store.root}: not a folder")
        found = []
        for folder, dirs, files in os.walk(store.root):
            here = Path(folder)
            if len(here.relative_to(store.root).parts) >= depth:
                dirs.clear()
            dirs.sort()
            if MANIFEST_NAME in files or any(f.startswith("shard-") for f in files):
                sub = LocalStore(here)
                found.append(_describe(str(here), sub.read_small(MANIFEST_NAME), sub.sizes(),
                                       sub.where(MANIFEST_NAME)))
        return found
    base = store.key("")
    by_folder: dict[str, dict[str, int]] = {}
    for key, size in store.list_keys(base).items():
        folder, _, name = key.rpartition("/")
        by_folder.setdefault(folder, {})[name] = size
    found = []
    for folder in sorted(by_folder):
        files = by_folder[folder]
        if MANIFEST_NAME in files or any(n.startswith("shard-") for n in files):
            sub = S3Store(store.bucket, folder, store.client)
            data = sub.read_small(MANIFEST_NAME) if MANIFEST_NAME in files else None
            found.append(_describe(sub.where(), data, files, sub.where(MANIFEST_NAME)))
    return found
