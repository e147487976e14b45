"""Every Pillow mode becomes the right 8-bit RGB: each checked against a reference computed here with NumPy
from the raw values the file was made of, not with Pillow's own conversions."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mist.cloud.datasets import ImageDataset, open_source
from mist.cloud.errors import CloudError
from mist.cloud.images import BACKGROUND, MAX_PIXELS, to_rgb

RNG = np.random.default_rng(17)
H, W = 6, 5
WHITE = np.array(BACKGROUND, dtype=np.float64)


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb.astype(np.float64) * a + WHITE * (1 - a)).astype(np.uint8)


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1)


def u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def saved(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        out = to_rgb(image, str(path))
    assert out.mode == "RGB" and out.size == (W, H)
    return np.asarray(out)


def test_bilevel(tmp_path):
    bits = RNG.integers(0, 2, size=(H, W)).astype(bool)
    path = saved(tmp_path, Image.fromarray(bits), "a.png")
    np.testing.assert_array_equal(decode(path), grey3(bits * 255))


def test_grey_and_grey_alpha(tmp_path):
    grey, alpha = u8(H, W), u8(H, W)
    np.testing.assert_array_equal(decode(saved(tmp_path, Image.fromarray(grey, "L"), "l.png")), grey3(grey))
    la = Image.fromarray(np.stack([grey, alpha], -1), "LA")
    np.testing.assert_array_equal(decode(saved(tmp_path, la, "la.png")), composite(grey3(grey), alpha))


def test_rgb_and_rgba(tmp_path):
    rgb, alpha = u8(H, W, 3), u8(H, W)
    np.testing.assert_array_equal(decode(saved(tmp_path, Image.fromarray(rgb, "RGB"), "c.png")), rgb)
    rgba = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
    np.testing.assert_array_equal(decode(saved(tmp_path, rgba, "ca.png")), composite(rgb, alpha))


def test_fully_transparent_pixels_show_the_background_not_the_hidden_colour(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)  # black, fully transparent: plain convert("RGB") gives black
    np.testing.assert_array_equal(decode(saved(tmp_path, Image.fromarray(rgba, "RGBA"), "t.png")),
                                  np.broadcast_to(np.array(BACKGROUND, np.uint8), (H, W, 3)))


@pytest.mark.parametrize("transparent", [False, True])
def test_palette(tmp_path, transparent):
    palette = u8(256, 3)
    index = RNG.integers(0, 16, size=(H, W)).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.ravel().tolist())
    expected = palette[index]
    kwargs = {}
    if transparent:
        kwargs["transparency"] = 3  # one palette entry is fully transparent (PNG tRNS)
        index[0, 0] = 3
        image = Image.fromarray(index, "P")
        image.putpalette(palette.ravel().tolist())
        expected = palette[index].copy()
        expected[index == 3] = BACKGROUND
    np.testing.assert_array_equal(decode(saved(tmp_path, image, "p.png", **kwargs)), expected)


def test_palette_with_alpha_per_entry(tmp_path):
    palette, alphas = u8(16, 3), u8(16)
    index = RNG.integers(0, 16, size=(H, W)).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.ravel().tolist())
    path = saved(tmp_path, image, "pa.png", transparency=alphas.tobytes())
    np.testing.assert_array_equal(decode(path), composite(palette[index], alphas[index]))


def test_cmyk(tmp_path):
    cmyk = u8(H, W, 4).astype(np.float64)
    path = saved(tmp_path, Image.fromarray(cmyk.astype(np.uint8), "CMYK"), "k.tif")
    c, m, y, k = (cmyk[..., i] for i in range(4))
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255
    assert np.abs(decode(path).astype(np.float64) - expected).max() <= 1.0


def test_ycbcr():
    ycc = u8(H, W, 3).astype(np.float64)
    image = Image.fromarray(ycc.astype(np.uint8), "YCbCr")
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128  # JPEG (full-range BT.601)
    expected = np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1), 0, 255)
    got = np.asarray(to_rgb(image)).astype(np.float64)
    assert np.abs(got - expected).max() <= 1.0


@pytest.mark.parametrize("mode, dtype, suffix", [("I;16", "<u2", "png"), ("I;16", "<u2", "tif"),
                                                  ("I;16B", ">u2", "tif"), ("I;16L", "<u2", "tif")])
def test_sixteen_bit_grey_is_scaled_not_saturated(tmp_path, mode, dtype, suffix):
    values = RNG.integers(0, 65536, size=(H, W)).astype(dtype)
    values[0, :3] = [0, 257 * 100, 65535]
    image = Image.frombytes(mode, (W, H), values.tobytes())
    got = decode(saved(tmp_path, image, f"g16.{suffix}"))
    np.testing.assert_array_equal(got, grey3(np.round(values.astype(np.float64) / 257)))
    assert got[0, 1, 0] == 100  # plain convert("RGB") would give 255


def test_thirty_two_bit_integer_grey(tmp_path):
    values = RNG.integers(-1000, 70000, size=(H, W)).astype(np.int32)
    got = decode(saved(tmp_path, Image.fromarray(values, "I"), "i.tif"))
    np.testing.assert_array_equal(got, grey3(np.round(np.clip(values, 0, 65535) / 257)))


def test_float_grey(tmp_path):
    values = RNG.uniform(-0.2, 1.2, size=(H, W)).astype(np.float32)
    values[0, 0] = np.nan
    got = decode(saved(tmp_path, Image.fromarray(values, "F"), "f.tif"))
    expected = np.round(np.clip(np.nan_to_num(values.astype(np.float64), nan=0.0), 0, 1) * 255)
    np.testing.assert_array_equal(got, grey3(expected))


def test_premultiplied_modes():
    rgb, alpha = u8(H, W, 3), u8(H, W)
    alpha[0, 0] = 0
    premultiplied = np.round(rgb.astype(np.float64) * alpha[..., None] / 255).astype(np.uint8)
    image = Image.fromarray(np.concatenate([premultiplied, alpha[..., None]], -1), "RGBa")
    # Undo the premultiplication, then composite: the same as compositing premultiplied values directly.
    expected = np.round(premultiplied + WHITE * (1 - alpha[..., None] / 255.0))
    assert np.abs(np.asarray(to_rgb(image)).astype(np.float64) - expected).max() <= 1.0


def test_animated_file_gives_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((H, W, 3), v, np.uint8)) for v in (10, 200, 90)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as image:
        image.seek(2)  # left on a later frame by some earlier reader
        got = np.asarray(to_rgb(image))
    assert np.abs(got.astype(int) - 10).max() <= 2  # GIF palettes quantise


def test_exif_orientation_is_applied(tmp_path):
    rgb = u8(H, W, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = saved(tmp_path, Image.fromarray(rgb), "o.png", exif=exif)
    with Image.open(path) as image:
        got = np.asarray(to_rgb(image))
    np.testing.assert_array_equal(got, np.rot90(rgb, k=-1))


def test_lab_is_refused_not_guessed():
    with pytest.raises(CloudError, match="LAB"):
        to_rgb(Image.new("LAB", (W, H)))


def _png_with_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height: what a decompression bomb looks like before decoding."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"IHDR")
    data[at + 4:at + 12] = struct.pack(">II", width, height)
    data[at + 17:at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at:at + 17])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [9000, 100_000])  # under Pillow's own error threshold, and far over it
def test_decompression_bomb_refused_before_decoding(tmp_path, side):
    """Refused in the extraction path as one skip reason, never decoded: 9000 x 9000 only warns in Pillow."""
    folder = tmp_path / "data" / "only"
    folder.mkdir(parents=True)
    _png_with_size(folder / "bomb.png", side, side)
    Image.new("L", (8, 8)).save(folder / "fine.png")
    source = open_source(str(tmp_path / "data"))
    dataset = ImageDataset(source, np.arange(2), lambda image: np.asarray(image))
    image, _, _, reason = dataset[0]
    assert image is None and ("pixel limit" in reason or "DecompressionBomb" in reason), reason
    assert dataset[1][0] is not None
    if side * side <= 2 * Image.MAX_IMAGE_PIXELS:
        with Image.open(folder / "bomb.png") as opened, pytest.raises(CloudError, match="pixel limit"):
            to_rgb(opened)
    assert side * side > MAX_PIXELS


def test_sources_decode_through_to_rgb(tmp_path):
    """The extraction path (Source.load) uses the same conversion: a 16-bit file is not saturated there."""
    folder = tmp_path / "data" / "only"
    folder.mkdir(parents=True)
    values = np.full((H, W), 257 * 40, np.uint16)
    Image.fromarray(values).save(folder / "g.png")
    source = open_source(str(tmp_path / "data"))
    assert np.asarray(source.load(0))[0, 0].tolist() == [40, 40, 40]
