"""Copy and verify a feature set between two stores, with the same code for ``push``, ``pull`` and ``verify``.

- **verified**: each shard's sha256 is computed while its bytes stream from the source, and the shard is
  committed at the destination only when it matches the manifest;
- **resumable**: a shard already at the destination is hashed and skipped when it matches; a partial one
  (a ``*.tmp`` file, an unfinished multipart upload) is never taken for a whole one;
- **atomic**: the manifest goes last, so a half-copied set has no manifest and reads as incomplete;
- **USB-safe**: names are checked against FAT32/exFAT's rules (the stores fsync what they write).

The manifest travels byte for byte, so a shipped set is byte-identical. The stores are seen only through the
``Store`` protocol (store.py); ``Progress`` is told what happens, and progress.py draws it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mist.formats import FormatError
from mist.formats.manifest import MANIFEST_NAME, Manifest

from .store import CHUNK, ShipError, Store

if TYPE_CHECKING:
    from mist.formats.signing import Trust

DOWNLOAD_ATTEMPTS = 3  # a dropped download stream restarts its shard, this many times at most

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


class Progress:
    """What a copy reports as it goes; this base class reports nothing (progress.py draws it)."""

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
    removed: list[str] = field(default_factory=list)  # shard files of a replaced set, deleted after the copy

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
                "verified": True, "removed": list(self.removed)}


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


def _load_manifest(store: Store, trust: Trust | None = None) -> tuple[bytes, Manifest]:
    where = store.where(MANIFEST_NAME)
    data = store.read_small(MANIFEST_NAME)
    if data is None:
        raise ShipError(f"{where}: missing manifest (is this a feature set? a half-copied one has none yet)")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise ShipError(f"{where}: manifest is not valid JSON") from None
    return data, Manifest.from_json(obj, source=where, trust=trust)  # the signature first, before any shard


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


_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


class _BackgroundHash:
    """A sha256 computed in a thread of its own while the caller writes this chunk and reads the next:
    hashlib releases the GIL on large buffers, so verification overlaps the transfer instead of adding to it.
    One chunk at most is being hashed, so memory stays at a chunk or two; ``hexdigest`` waits for the last."""

    def __init__(self) -> None:
        global _hash_pool
        with _hash_pool_lock:
            if _hash_pool is None:
                _hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mist-sha256")
        self._pool, self._digest = _hash_pool, hashlib.sha256()
        self._pending: Future | None = None

    def update(self, block: bytes) -> None:
        self._wait()
        self._pending = self._pool.submit(self._digest.update, block)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def hexdigest(self) -> str:
        self._wait()
        return self._digest.hexdigest()


def _hash_stream(chunks: Iterable[bytes], digest: Any, progress: Progress, throttle: _Throttle,
                 ) -> Iterator[bytes]:
    for block in chunks:
        digest.update(block)
        progress.advance(len(block))
        throttle(len(block))
        yield block


def _matches(store: Store, name: str, sha256: str, progress: Progress, throttle: _Throttle,
             ) -> bool:
    digest = _BackgroundHash()
    for _ in _hash_stream(store.chunks(name), digest, progress, throttle):
        pass
    return digest.hexdigest() == sha256


def _same_set(a: Manifest, b: Manifest) -> bool:
    return a.layout_fingerprint() == b.layout_fingerprint() and a.shards == b.shards


def copy_set(src: Store, dst: Store, progress: Progress | None = None,
             overwrite: bool = False, max_rate: float | None = None, trust: Trust | None = None) -> Report:
    """Copy the complete feature set at ``src`` to ``dst``, shard by shard, manifest last; with ``trust``, the
    manifest's signature is checked before any shard is copied."""
    progress = progress or Progress()
    if src.place() == dst.place():
        raise ShipError(f"{dst.where()}: source and destination are the same place")
    manifest_bytes, manifest = _load_manifest(src, trust)
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
    # A set replaced with --overwrite may have had more shards: the manifest no longer lists them, so they are
    # dead weight on the stick (and would be taken for this set's by anyone looking at the folder).
    listed = {s.file for s in manifest.shards}
    for name in sorted(dst_sizes):
        if fnmatch.fnmatch(name, "shard-*.safetensors*") and name not in listed:
            dst.delete(name)
            report.removed.append(name)
    report.seconds = time.perf_counter() - start
    progress.end()
    return report


def _copy_shard(src: Store, dst: Store, name: str, sha256: str, size: int,
                progress: Progress, throttle: _Throttle, chunk: int) -> None:
    for attempt in range(DOWNLOAD_ATTEMPTS):
        digest = _BackgroundHash()

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


def verify_set(store: Store, progress: Progress | None = None, trust: Trust | None = None) -> Report:
    """Hash every shard at ``store`` against its manifest, streaming; raise naming the first bad one."""
    progress = progress or Progress()
    _, manifest = _load_manifest(store, trust)
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
