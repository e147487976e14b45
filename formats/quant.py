"""Quantised storage of summed features: int8 and int4 codes with one fp16 scale per token.

Adding a scheme is one entry in ``SCHEMES`` (its bits, its qmax, one code a byte or two) and its line in
formats/SPEC.md §12: the manifest, the writer, the reader, the wire format and both CLIs' ``--dtype`` take
their lists from here.

A row is (k, T, d). Every token (row, group, token) gets its own scale ``s``, the smallest fp16 number at
least ``absmax / qmax`` (qmax = 127 for int8, 7 for int4), and every channel becomes the integer code
``q = clamp(rint(x / s), -qmax, qmax)``. The device reads ``x' = q * s`` in fp32, exactly (a 4- or 8-bit
code times an 11-bit fp16 mantissa fits fp32). Because ``s`` is rounded *up*, ``|x / s| <= qmax`` and the
clamp never cuts a value, so ``|x - x'| <= s * (0.5 + 2**-16)`` holds for every element (the 2**-16 is the
fp32 division's rounding; formats/SPEC.md §12).

int4 codes are stored offset by 8 (nibble = q + 8, in 1..15), two to a byte: the row's k·T·d codes in C
order, element 2i in the low nibble of byte i and element 2i+1 in the high nibble. An odd count leaves the
last high nibble 0. A packed row is therefore ceil(k·T·d / 2) bytes, whatever T and d are.

``encode_features`` turns an fp32 (B, k, T, d) batch into the tensors a shard stores, for every storage
dtype; ``decode_features`` is its inverse for one batch of rows. The writer (so ``mist-cloud extract``) and
``mist-cloud convert`` go through them, and so should anything else that ships features. NumPy only: the
device imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES, SCALES = "features", "scales"
FLOAT_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
SCALE_DTYPE = np.dtype("<f2")
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Scheme:
    """How one quantised storage dtype is laid out; ``describe`` is what the manifest records."""

    dtype: str
    bits: int
    qmax: int
    code_dtype: np.dtype  # the safetensors dtype of the stored `features` tensor
    packed: bool = False  # two codes a byte (pack_int4), else one int8 code a byte

    def describe(self) -> dict[str, object]:
        return {"scheme": "absmax-per-token", "bits": self.bits, "qmax": self.qmax, "scale_dtype": "float16",
                "scale_rounding": "up", "rounding": "nearest-even",
                "packing": "two-per-byte-low-nibble-first-offset-8" if self.packed else "one-per-byte"}


SCHEMES = {
    "int8": Scheme("int8", 8, 127, np.dtype("i1")),
    "int4": Scheme("int4", 4, 7, np.dtype("u1"), packed=True),
}
STORAGE_DTYPES = (*FLOAT_DTYPES, *SCHEMES)


class QuantError(ValueError):
    """The fp32 input cannot be stored in the asked dtype (non-finite, or too large for an fp16 scale)."""


def is_quantised(dtype: str) -> bool:
    return dtype in SCHEMES


def packed_length(values: int) -> int:
    """Bytes that hold ``values`` int4 codes."""
    return (values + 1) // 2


def stored_shapes(dtype: str, rows: int, row_shape: tuple[int, int, int]) -> dict[str, tuple[np.dtype, tuple]]:
    """The (dtype, shape) of each feature tensor a shard of ``rows`` rows holds."""
    if dtype in FLOAT_DTYPES:
        return {FEATURES: (FLOAT_DTYPES[dtype], (rows, *row_shape))}
    k, t, d = row_shape
    scales = (SCALE_DTYPE, (rows, k, t))
    scheme = SCHEMES[dtype]
    if not scheme.packed:
        return {FEATURES: (scheme.code_dtype, (rows, k, t, d)), SCALES: scales}
    return {FEATURES: (scheme.code_dtype, (rows, packed_length(k * t * d))), SCALES: scales}


def bytes_per_row(dtype: str, row_shape: tuple[int, int, int]) -> int:
    """What one image costs to ship in this dtype, scales included."""
    total = 0
    for storage, shape in stored_shapes(dtype, 1, row_shape).values():
        total += int(np.prod(shape)) * storage.itemsize
    return total


# ---- encoding (cloud side) --------------------------------------------------------------------------------


def token_scales(x: np.ndarray, qmax: int) -> np.ndarray:
    """One fp16 scale per token of an fp32 (B, k, T, d) batch: the least fp16 >= absmax / qmax.

    An all-zero token gets scale 1 (its codes are all 0): a scale is never 0, so a 0 on disk means damage.
    """
    absmax = np.max(np.abs(x), axis=-1)
    wanted = absmax / np.float32(qmax)
    if not np.isfinite(absmax).all():
        raise QuantError("features hold NaN or inf; they cannot be quantised")
    if wanted.size and float(wanted.max()) > FP16_MAX:
        raise QuantError(f"a token reaches |x| = {float(absmax.max()):.4g}, too large for an fp16 scale "
                         f"(at most {FP16_MAX * qmax:.4g} with {qmax} levels)")
    scale = wanted.astype(np.float16)
    low = scale.astype(np.float32) < wanted  # fp16 rounded down: step up one ulp so |x / s| <= qmax
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    scale[absmax == 0] = 1.0
    return scale


def quantise(x: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """fp32 (B, k, T, d) -> int8 codes of the same shape and fp16 scales (B, k, T)."""
    x = np.asarray(x, dtype=np.float32)
    scale = token_scales(x, scheme.qmax)
    codes = np.rint(x / scale.astype(np.float32)[..., None])
    np.clip(codes, -scheme.qmax, scheme.qmax, out=codes)
    return codes.astype(np.int8), scale


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """int8 codes in [-7, 7] of shape (B, ...) -> (B, ceil(n / 2)) bytes, n = the codes per row."""
    flat = codes.reshape(len(codes), -1)
    nibbles = (flat.astype(np.int16) + 8).astype(np.uint8)
    if flat.shape[1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros((len(flat), 1), np.uint8)], axis=1)
    return np.ascontiguousarray(nibbles[:, 0::2] | (nibbles[:, 1::2] << 4))


def encode_features(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """An fp32 (B, k, T, d) batch -> the C-contiguous feature tensors a shard stores in ``dtype``."""
    if dtype in FLOAT_DTYPES:
        return {FEATURES: np.ascontiguousarray(x, dtype=FLOAT_DTYPES[dtype])}
    if dtype not in SCHEMES:
        raise ValueError(f"unknown storage dtype {dtype!r}; one of {STORAGE_DTYPES}")
    codes, scale = quantise(x, SCHEMES[dtype])
    stored = pack_int4(codes) if SCHEMES[dtype].packed else np.ascontiguousarray(codes)
    return {FEATURES: stored, SCALES: np.ascontiguousarray(scale)}


# ---- decoding (device side) -------------------------------------------------------------------------------


def unpack_int4_reference(packed: np.ndarray, values: int) -> np.ndarray:
    """The readable inverse of ``pack_int4``: code i is nibble i % 2 (low first) of byte i // 2, minus 8."""
    i = np.arange(values)
    nibble = (packed[:, i // 2] >> (4 * (i % 2)).astype(np.uint8)) & 0x0F
    return nibble.astype(np.int8) - 8


def unpack_int4(packed: np.ndarray, values: int) -> np.ndarray:
    """Fast path of ``unpack_int4_reference`` (tests compare them): two whole-array bit operations written
    straight into the interleaved int8 result. Measured ~12x faster than a 256-entry lookup table in NumPy."""
    codes = np.empty((len(packed), 2 * packed.shape[1]), np.int8)
    np.bitwise_and(packed, 0x0F, out=codes[:, 0::2], casting="unsafe")
    np.right_shift(packed, 4, out=codes[:, 1::2], casting="unsafe")
    codes -= 8
    return codes[:, :values]


def decode_features(stored: dict[str, np.ndarray], dtype: str, row_shape: tuple[int, int, int],
                    out: np.ndarray | None = None) -> np.ndarray:
    """The stored tensors of B rows -> fp32 (B, k, T, d), written into ``out`` when given."""
    rows = len(stored[FEATURES])
    if out is None:
        out = np.empty((rows, *row_shape), np.float32)
    if dtype in FLOAT_DTYPES:
        out[...] = stored[FEATURES]
        return out
    codes = stored[FEATURES]
    if SCHEMES[dtype].packed:
        codes = unpack_int4(codes, int(np.prod(row_shape))).reshape(rows, *row_shape)
    # int8 codes times fp32 scales: exact, and the result lands in `out` with no fp32 temporary.
    np.multiply(codes, stored[SCALES].astype(np.float32)[..., None], out=out)
    return out


def dequantise_reference(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """x' = q * s, element by element: what ``decode_features`` must equal."""
    return codes.astype(np.float32) * scales.astype(np.float32)[..., None]


def bad_scale(scales: np.ndarray) -> tuple[tuple[int, ...], str] | None:
    """The first scale that is NaN, inf, zero or negative, as (index, what), or None when all are fine."""
    ok = np.isfinite(scales) & (scales > 0)
    if ok.all():
        return None
    where = tuple(int(i) for i in np.argwhere(~ok)[0])
    value = float(scales[where])
    what = "NaN" if np.isnan(value) else "inf" if np.isinf(value) else "zero" if value == 0 else "negative"
    return where, what
