"""Turn untrusted image bytes into an RGB PIL image, or a named reason to skip it.

Real corpora (a Reddit dump, say) hold zero-byte files, truncated JPEGs, HTML saved as .jpg,
decompression bombs, CMYK, 16-bit greyscale, palette images with transparency and animations.
None of these may kill a build: each either converts to plain RGB or raises ``BadImage`` with a
short reason that the build logs and counts.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# 2 * PIL's default: generous for photos, still refuses bombs that would eat the RAM.
MAX_PIXELS = 178_956_970
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """The bytes are not an image we can use; ``str(e)`` is the skip reason."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode and normalise to RGB (transparent areas over white, animations' first frame).

    ``draft_to=(w, h)``: a JPEG may be decoded at a reduced DCT scale whose size still covers
    (w, h) on both sides (what a model that resizes to (w, h) needs); ``img.info["original_size"]``
    then holds the stored size."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"decompression bomb ({w}x{h} pixels)")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if draft_to is not None and img.format == "JPEG":
                img.draft(img.mode, draft_to)
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression bomb") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).lower()
        reason = "truncated image" if ("truncat" in msg or "broken data" in msg or "eof" in msg) else "corrupt image"
        raise BadImage(reason) from e
    if img.width < 1 or img.height < 1:
        raise BadImage("zero-size image")
    out = to_rgb(img)
    out.info["original_size"] = (w, h)
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High bit depth greyscale: rescale the actual range to 8 bits (PIL's convert clips).
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV
