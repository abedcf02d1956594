"""Bad image bytes either convert to RGB or raise BadImage with a reason; never crash."""

import io

import numpy as np
import pytest
from PIL import Image

from saefe.ingest.images import BadImage, decode_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h=32, w=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"<html><body>404</body></html>", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "image"),  # header only
    ],
)
def test_unusable_bytes_are_named(data, reason):
    with pytest.raises(BadImage) as e:
        decode_image(data)
    assert reason in str(e.value)


def test_truncated_jpeg_is_skipped_not_crashed():
    data = _bytes(_rgb(200, 200), "JPEG", quality=90)
    with pytest.raises(BadImage) as e:
        decode_image(data[: len(data) // 2])
    assert "truncated" in str(e.value) or "corrupt" in str(e.value)


def test_decompression_bomb_refused_before_decoding():
    data = _bytes(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(data, max_pixels=1_000_000)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _bytes(Image.new("CMYK", (20, 10), (10, 200, 30, 0)), "JPEG"),
        lambda: _bytes(Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300), "PNG"),
        lambda: _bytes(Image.new("LA", (20, 10), (100, 0)), "PNG"),
        lambda: _bytes(Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"),
    ],
    ids=["cmyk", "16-bit", "grey+alpha", "rgba"],
)
def test_odd_modes_become_rgb(make):
    img = decode_image(make())
    assert img.mode == "RGB" and img.size == (20, 10)


def test_transparent_areas_composite_on_white():
    img = decode_image(_bytes(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"))
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency():
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img = decode_image(_bytes(p, "PNG", transparency=0))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 10, 10)


def test_16bit_range_is_rescaled_not_clipped():
    a = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)
    img = decode_image(_bytes(Image.fromarray(a), "PNG"))
    px = np.asarray(img)[..., 0]
    assert px.min() == 0 and px.max() == 255  # PIL's plain convert would clip everything to 255


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(data).getpixel((0, 0))
    assert r > 200 and g < 50 and b < 50
