"""Turn any image file Pillow opens into the 8-bit RGB pixels a person would see, or refuse it.

``Image.convert("RGB")`` alone is wrong for several modes, silently: a 16-bit greyscale image (``I;16``,
``I``) saturates to white above 255, a float image (``F``) likewise, and transparency is dropped, so the
colour hidden under transparent pixels (often black or noise) becomes part of the picture. The choices,
documented in docs/cloud.md and docs/guarantees.md:

- **Orientation**: the EXIF orientation tag is applied, so a photo taken upright is fed upright. An EXIF
  block Pillow cannot parse is ignored (the pixels are used as stored), as image viewers do.
- **Animation**: the first frame, as a still viewer shows it.
- **Transparency** (``LA``, ``PA``, ``RGBA``, ``RGBa``, ``P`` with a ``transparency`` entry): composited
  over a white background (``BACKGROUND``), the way the image looks on a web page.
- **16-bit** (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and **32-bit integer** (``I``): the 0..65535 range
  maps linearly onto 0..255 (``round(v / 257)``); ``I`` values outside it are clipped.
- **Float** (``F``): 0.0..1.0 maps onto 0..255; values outside are clipped, NaN becomes 0.
- **CMYK**, **YCbCr**, **HSV**, ``1``, ``L``, ``P``, ``RGBX``: Pillow's conversions, which match the textbook
  formulas (tests check them against NumPy references). Embedded ICC profiles are not applied.
- **LAB** and any other mode: refused, since Pillow has no faithful conversion.
- **Size**: more than ``MAX_PIXELS`` pixels is refused before decoding (a decompression bomb: a small file
  that unpacks to gigabytes).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from .errors import CloudError

BACKGROUND = (255, 255, 255)
# 8192 x 8192. Above this an image is refused before its pixels are decoded; Pillow's own guard (89.5 M
# pixels) only warns up to twice its limit.
MAX_PIXELS = 8192 * 8192

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa", "La")
_PILLOW_EXACT = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "HSV")


def check_size(image: Image.Image, where: str = "image") -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise CloudError(f"{where}: {width}x{height} pixels exceeds the {MAX_PIXELS:,}-pixel limit "
                         "(a decompression bomb, or an image far larger than any backbone's input)")


def to_rgb(image: Image.Image, where: str = "image") -> Image.Image:
    """A new, fully decoded 8-bit RGB image of what ``image`` shows (see the module docstring)."""
    check_size(image, where)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: keep the stored orientation rather than lose the image
        oriented = image
    image = oriented if oriented is not None else image
    check_size(image, where)
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode == "P" and "transparency" in image.info:
        return _over_background(image.convert("RGBA"))
    if mode in _PILLOW_EXACT:
        return image.convert("RGB")
    if mode in _ALPHA_MODES:
        return _over_background(image.convert("RGBA") if mode != "La" else _la_to_rgba(image))
    if mode in _SIXTEEN_BIT:
        values = np.asarray(image).astype(np.float64)
        return _grey(np.round(np.clip(values, 0, 65535) / 257.0))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return _grey(np.round(np.clip(values, 0.0, 1.0) * 255.0))
    raise CloudError(f"{where}: image mode {mode!r} has no faithful RGB conversion; convert the file to RGB")


def _grey(values: np.ndarray) -> Image.Image:
    grey = values.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.stack([grey] * 3, axis=-1)), "RGB")


def _la_to_rgba(image: Image.Image) -> Image.Image:
    # "La" is premultiplied grey + alpha, which Pillow cannot convert: un-premultiply by hand.
    la = np.asarray(image).astype(np.float64)
    alpha = la[..., 1]
    grey = np.where(alpha > 0, np.clip(la[..., 0] * 255.0 / np.maximum(alpha, 1), 0, 255), 0)
    rgba = np.stack([grey, grey, grey, alpha], axis=-1)
    return Image.fromarray(np.round(rgba).astype(np.uint8), "RGBA")


def _over_background(rgba: Image.Image) -> Image.Image:
    """Alpha-composite straight (not premultiplied) RGBA over BACKGROUND, rounding to the nearest value."""
    pixels = np.asarray(rgba).astype(np.float64)
    alpha = pixels[..., 3:4] / 255.0
    background = np.array(BACKGROUND, dtype=np.float64)
    rgb = pixels[..., :3] * alpha + background * (1.0 - alpha)
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
