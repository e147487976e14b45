"""PNG files written by hand (zlib + struct), so the device draws masks without Pillow or matplotlib.

Two kinds: a palette image (colour type 3), one byte a pixel indexing a colour table, which is how label
maps are usually stored (VOC's masks are such files: a viewer shows colours, a program reads the indices);
and an RGB image (colour type 2) for report pictures. Every row is stored with filter 0 (none): masks are
mostly flat areas, which zlib compresses well without a filter.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from mist.formats.atomic import atomic_write_bytes

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def label_palette() -> np.ndarray:
    """(256, 3) uint8 colours: class 0 black, each further class a distinct colour from the bits of its index
    (the VOC colour map's rule), and 255, the ignore index, white."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        value, colour = index, [0, 0, 0]
        for shift in range(7, -1, -1):  # the index's bits, spread over the three channels from the top bit down
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette[index] = colour
    palette[255] = 255
    return palette


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bytes(pixels: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """(H, W) uint8 indices with a (n, 3) palette, or (H, W, 3) uint8 RGB -> the bytes of a PNG file."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    colour_type = 3 if palette is not None else 2
    if (palette is not None) != (pixels.ndim == 2) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError("a palette image is (H, W) with a palette; an RGB image is (H, W, 3) without one")
    rows = pixels.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row
    parts = [_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))]
    if palette is not None:
        parts.append(_chunk(b"PLTE", np.ascontiguousarray(palette, np.uint8).tobytes()))
    parts += [_chunk(b"IDAT", zlib.compress(raw, 9)), _chunk(b"IEND", b"")]
    return b"".join(parts)


def write_png(path: str | os.PathLike, pixels: np.ndarray, palette: np.ndarray | None = None) -> None:
    atomic_write_bytes(path, png_bytes(pixels, palette))
