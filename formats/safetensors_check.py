"""Validate a safetensors file's header before any library maps it.

The safetensors library trusts offsets it reads; a truncated or hand-edited file can make it fail in ways
that are hard to read. This module reads the 8-byte length and the JSON header itself, checks every field
against the file's real size, and raises :class:`FormatError` with one line that names the file.
``write_safetensors`` is its inverse, and writes the same bytes every time for the same input.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FormatError

# Headers of real mist files are a few hundred bytes; 16 MiB is safetensors' own cap too (it refuses
# larger), so an absurd length is rejected before we try to read it.
MAX_HEADER_BYTES = 16 * 1024 * 1024

# The dtypes NumPy can hold. bf16 is deliberately absent: NumPy cannot read it.
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _fail(path: Path, problem: str) -> FormatError:
    return FormatError(f"{path}: {problem}")


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """``open(path, "rb")`` for a regular file only, refusing a FIFO, a device or a socket before it can block.

    Opening a FIFO for reading waits for a writer, forever, and a device such as /dev/zero never ends, so the
    file is opened without blocking, checked with fstat (the very file opened, not a name that could be swapped
    after a stat), and only then read. Raises FormatError naming ``path``; OSError as ``open`` does.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a socket" if stat.S_ISSOCK(mode) else "a special file"
            raise FormatError(f"{path}: is {kind}, not a regular file; refused before reading it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check a safetensors header; every tensor must lie inside the file and fill it exactly."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"truncated: {size} bytes is too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap")
            if 8 + header_len > size:
                raise _fail(path, f"header length {header_len} is larger than the file ({size} bytes)")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise _fail(path, "missing file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a safetensors file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except OSError as e:  # e.g. a name too long, a symlink loop: still one line, not a traceback
        raise _fail(path, f"unreadable ({e.strerror or e.__class__.__name__})") from None
    return _parse_header(path, raw, size)


def header_from_bytes(path: str | os.PathLike, data: bytes) -> Header:
    """``read_header`` for a file already read into memory (``data``), checked by the same rules."""
    path = Path(path)
    if len(data) < 8:
        raise _fail(path, f"truncated: {len(data)} bytes is too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if 8 + header_len > len(data):
        raise _fail(path, f"header length {header_len} is larger than the file ({len(data)} bytes)")
    return _parse_header(path, data[8:8 + header_len], len(data))


def _parse_header(path: Path, raw: bytes, size: int) -> Header:
    header_len = len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    # ValueError, not just JSONDecodeError: an integer literal over Python's 4300-digit limit raises a bare
    # ValueError from inside json.loads.
    except (ValueError, RecursionError):
        raise _fail(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")

    # Only an absent or null __metadata__ means "none"; 0, "" or [] are malformed (safetensors refuses them).
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorEntry] = {}
    spans = []
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_start, data_size)
        spans.append((entry["data_offsets"][0], entry["data_offsets"][1]))
    # safetensors lays tensors end to end; a gap or overlap means a forged or damaged header, and the
    # last tensor must end exactly at the end of the file (otherwise the file was truncated or padded).
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise _fail(path, "tensor data regions overlap or leave gaps")
        position = end
    if position != data_size:
        raise _fail(
            path, f"truncated or padded: tensors need {position} data bytes, the file holds {data_size}"
        )
    return Header(path=path, tensors=tensors, metadata=dict(metadata))


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r}: entry is not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    # isinstance first: a list or object as dtype is unhashable, and `in DTYPES` would raise TypeError.
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(path, f"tensor {name!r}: unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
        raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise _fail(path, f"tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    dtype = DTYPES[dtype_name]
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if begin > end:
        raise _fail(path, f"tensor {name!r}: data offsets [{begin}, {end}] are reversed")
    if end > data_size:
        raise _fail(path, f"truncated: tensor {name!r} ends at data byte {end}, the file holds {data_size}")
    if end - begin != nbytes:
        raise _fail(path, f"tensor {name!r}: shape {shape} needs {nbytes} bytes, offsets span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, nbytes)


def expect_tensor(header: Header, name: str, dtypes: tuple[np.dtype, ...], shape: tuple) -> TensorEntry:
    """Check that ``name`` exists with one of ``dtypes`` and ``shape`` (None in shape = any size)."""
    entry = header.tensors.get(name)
    if entry is None:
        raise _fail(header.path, f"tensor {name!r} is missing")
    if entry.dtype not in dtypes:
        allowed = "/".join(DTYPE_NAMES[d] for d in dtypes)
        raise _fail(header.path, f"tensor {name!r} has dtype {DTYPE_NAMES[entry.dtype]}, expected {allowed}")
    if len(entry.shape) != len(shape) or any(e is not None and e != s for e, s in zip(shape, entry.shape)):
        want = tuple("*" if e is None else e for e in shape)
        raise _fail(header.path, f"tensor {name!r} has shape {entry.shape}, expected {want}")
    return entry


def stored_array(value: np.ndarray, where: str = "tensor") -> np.ndarray:
    """``value`` as ``write_safetensors`` stores it: C order, little-endian, a dtype the format holds."""
    # C order, since the raw buffer is written as is (safetensors 0.8 itself wrote the wrong bytes for
    # non-contiguous input). np.require, not np.ascontiguousarray: the latter turns a 0-d scalar (an
    # optimizer's step count) into shape (1,).
    array = np.require(value, requirements="C")
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    if array.dtype not in DTYPE_NAMES:
        raise ValueError(f"{where} has dtype {array.dtype}, which safetensors files here cannot hold")
    return array


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on the arguments.

    ``safetensors.numpy.save_file`` emits ``__metadata__`` in Rust hash-map order, which changes from call to
    call, so the same shard written twice got two sha256s: a resumed extraction never matched an
    uninterrupted one, and a set's fingerprint changed on every re-extraction. Here the metadata keys are
    sorted and tensors are laid out as safetensors lays them out (widest dtype first, then by name), so every
    tensor starts aligned to its itemsize.
    """
    arrays = {name: stored_array(value, f"{path}: tensor {name!r}") for name, value in tensors.items()}
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    position = 0
    for name in order:
        array = arrays[name]
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [position, position + array.nbytes]}
        position += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data starts 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            # A uint8 view writes the array's buffer without the full copy tobytes() would make.
            f.write(arrays[name].reshape(-1).view(np.uint8))
