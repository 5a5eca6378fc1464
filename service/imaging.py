"""Decoding uploaded bytes into an upright RGB Pillow image, safely.

EXIF orientation is applied, every Pillow mode becomes RGB, large JPEGs are decoded at a
reduced scale (``Image.draft``) when the model needs far fewer pixels, and byte and pixel
limits are checked before any pixel is decoded, so decompression bombs cost nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage

# Our own pixel limit replaces Pillow's global bomb check (which warns, then raises, at
# thresholds that are not ours to choose).
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image and the size the client's image has after EXIF orientation."""

    image: Image.Image
    width: int   # original width after EXIF transpose (before any draft reduction)
    height: int
    format: str | None


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, draft_to: int | None = None) -> DecodedImage:
    """Decode ``data`` into an upright RGB image.

    ``draft_to``: the largest side the model needs; a JPEG is decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) that still leaves both sides at least this large.
    Raises InvalidImage (not an image, truncated, corrupt) or ImageTooLarge (limits).
    """
    if not data:
        raise InvalidImage("the upload is empty")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the upload is {len(data)} bytes; the limit is {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage("the upload is not an image Pillow can identify") from None
    except Exception as exc:  # Pillow raises assorted errors on hostile headers
        raise InvalidImage(f"the image header cannot be read: {exc}") from None
    w0, h0 = img.size
    if w0 <= 0 or h0 <= 0:
        raise InvalidImage(f"the image has an empty size {w0}x{h0}")
    if w0 * h0 > max_pixels:
        raise ImageTooLarge(f"the image is {w0}x{h0} = {w0 * h0} pixels; the limit is {max_pixels}")
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    width, height = (h0, w0) if orientation in _SWAPPING_ORIENTATIONS else (w0, h0)
    fmt = img.format
    try:
        if draft_to and fmt == "JPEG" and min(w0, h0) >= 2 * draft_to:
            img.draft("RGB", (draft_to, draft_to))
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"the image data is truncated or corrupt: {exc}") from None
    return DecodedImage(img, width, height, fmt)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; alpha is composited over white, 16/32-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")
