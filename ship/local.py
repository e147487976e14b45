"""A feature set in a folder on a local filesystem: a disk, a mounted USB stick or SD card.

Each shard is written to ``name.tmp``, fsynced, checked and renamed, then the folder is fsynced; the manifest
is written the same way, last. Before a copy it checks the free space and, on FAT32, the 4 GiB file limit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mist.formats.atomic import TMP_SUFFIX, atomic_write_bytes, fsync_dir
from mist.formats.manifest import MANIFEST_NAME
from mist.formats.safetensors_check import open_regular
from mist.kit.text import format_bytes

from .store import CHUNK, ShipError

FAT32_MAX_FILE = (4 << 30) - 1  # FAT32 stores a file's size in 32 bits


class LocalStore:
    """A feature-set directory on a local filesystem (a mounted USB stick counts)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def where(self, name: str | None = None) -> str:
        return str(self.root if name is None else self.root / name)

    def place(self) -> str:
        return str(self.root.resolve())

    def read_small(self, name: str) -> bytes | None:
        path = self.root / name
        try:
            with open_regular(path) as f:  # a FIFO would block, a device never end
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ShipError(f"{path}: {e.strerror or e}") from None

    def sizes(self) -> dict[str, int]:
        try:
            # Every entry but folders: a FIFO or a device listed as a shard must reach the read, which refuses it
            # by name (open_regular), rather than look "missing".
            return {p.name: p.stat().st_size for p in self.root.iterdir() if not p.is_dir()}
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ShipError(f"{self.root}: {e.strerror or e}") from None

    def chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes]:
        path = self.root / name
        try:
            with open_regular(path) as f:
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
        # Read-only first: a read-only stick that is also nearly full must not be reported as short of space.
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY) or not os.access(probe, os.W_OK)
        except OSError:
            read_only = False
        if read_only:
            raise ShipError(f"{self.root}: Read-only file system or folder ({probe} cannot be written)")
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            return
        if needed > free:
            raise ShipError(f"{self.root}: needs {format_bytes(needed)} more but only {format_bytes(free)} are free")
        if largest > FAT32_MAX_FILE and _filesystem_type(probe) in ("vfat", "msdos"):
            raise ShipError(f"{self.root}: is on FAT32, whose files stop at 4 GiB, and a shard holds "
                            f"{format_bytes(largest)}; re-extract with smaller --shard-rows or use exFAT")

    def folders(self, depth: int) -> Iterator[tuple[LocalStore, dict[str, int]]]:
        """The root and its subfolders down to ``depth`` levels, in name order, each with its files."""
        if not self.root.is_dir():
            raise ShipError(f"{self.root}: not a folder")
        for folder, dirs, _files in os.walk(self.root):
            here = Path(folder)
            if len(here.relative_to(self.root).parts) >= depth:
                dirs.clear()
            dirs.sort()
            sub = LocalStore(here)
            yield sub, sub.sizes()


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
