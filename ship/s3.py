"""A feature set in object storage: ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint (MinIO, Ceph, R2).

Objects are ``PREFIX/manifest.json`` and ``PREFIX/shard-NNNNN.safetensors``. A shard up to the part size is one
PUT, a larger one a multipart upload; either is committed only after its streamed checksum matches, and the
sha256 rides along as object metadata. boto3 is imported only when a client is made, so the base install
(numpy, click, safetensors) ships between folders without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mist.formats.manifest import MANIFEST_NAME

from .store import CHUNK, ShipError

DEFAULT_PART_SIZE = 64 << 20  # multipart upload above this; S3 wants parts of 5 MiB to 5 GiB
MIN_PART_SIZE = 5 << 20
SHA_METADATA = "mist-sha256"  # user metadata on each uploaded shard: the manifest's checksum for it
S3_EXTRA = "pip install 'mist-tuning[s3]'"
ENDPOINT_ENV = "MIST_S3_ENDPOINT_URL"


class S3Store:
    """A feature set stored as objects ``PREFIX/manifest.json``, ``PREFIX/shard-NNNNN.safetensors``."""

    def __init__(self, bucket: str, prefix: str, client: Any, part_size: int = DEFAULT_PART_SIZE):
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client
        self.part_size = max(part_size, MIN_PART_SIZE)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str | None = None) -> str:
        key = self.prefix if name is None else self.key(name)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def place(self) -> str:
        return self.where()

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

    def folders(self, depth: int) -> Iterator[tuple[S3Store, dict[str, int]]]:
        """Every key prefix below this one that holds objects, in order, from one listing (a bucket has no
        levels to stop at, so ``depth`` does not apply)."""
        base = self.key("")
        by_folder: dict[str, dict[str, int]] = {}
        for key, size in self.list_keys(base).items():
            folder, _, name = key.rpartition("/")
            by_folder.setdefault(folder, {})[name] = size
        for folder in sorted(by_folder):
            yield S3Store(self.bucket, folder, self.client), by_folder[folder]


def from_url(url: str, endpoint_url: str | None = None, part_size: int | None = None) -> S3Store:
    """``s3://bucket/prefix``, with a client for ``endpoint_url`` (default: $MIST_S3_ENDPOINT_URL, else AWS)."""
    bucket, _, prefix = url.partition("://")[2].partition("/")
    if not bucket:
        raise ShipError(f"{url}: the URL names no bucket (s3://bucket/prefix)")
    return S3Store(bucket, prefix, s3_client(endpoint_url, url), part_size=part_size or DEFAULT_PART_SIZE)


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
