"""Loading an image file or upload into an upright RGB (or greyscale) image: the one decode everyone uses.

Training loaders, evaluation, the parity check, the benchmark's ceiling and the service all
call :func:`load_image` (or :func:`load_input`, which also resizes to a model's input), so a
model sees in production exactly the pixels it was trained and evaluated on:

- EXIF orientation is applied (phone photos come out upright);
- every Pillow mode becomes RGB: alpha is composited over white, palette transparency too,
  16-bit grey is scaled by 255/65535, CMYK/YCbCr/1-bit/L are converted by Pillow; a model
  whose contract asks for one channel gets that RGB image converted to greyscale ("L");
- a JPEG at least twice the size the model needs is decoded at a reduced DCT scale
  (``Image.draft``): several times faster, and the same in training as in serving;
- byte and pixel limits are checked from the header, before any pixel is decoded, so a
  decompression bomb costs nothing.

Errors are core.errors.InvalidImage / ImageTooLarge.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.contract import InputSpec
from core.errors import ImageTooLarge, InvalidImage
from core.geometry import Geometry, resize_to_input

# Our own pixel limit replaces Pillow's global bomb check (which warns, then raises, at
# thresholds that are not ours to choose).
Image.MAX_IMAGE_PIXELS = None

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
# What Pillow raises on truncated or hostile pixel data (besides plain OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError,
                  ZeroDivisionError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB (or "L") image and the size the client's image has after EXIF orientation."""

    image: Image.Image
    width: int   # original width after EXIF transpose (before any draft reduction)
    height: int
    format: str | None


def load_image(source: bytes | Path | str, *, max_bytes: int | None = None, max_pixels: int | None = None,
               draft_to: int | None = None, color: str = "RGB") -> DecodedImage:
    """Decode ``source`` (the encoded bytes, or a file path) into an upright RGB image
    (``color`` "L": then converted to greyscale, for one-channel models).

    ``draft_to``: the largest side the model needs; a JPEG is decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) that still leaves both sides at least this large.
    ``max_bytes`` / ``max_pixels``: limits (None: none). Raises InvalidImage or ImageTooLarge.
    """
    data = source if isinstance(source, bytes) else _read(Path(source), max_bytes)
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage("the data is not an image Pillow can identify") from None
    except Exception as exc:  # Pillow raises assorted errors on hostile headers
        raise InvalidImage(f"the image header cannot be read: {exc}") from None
    w0, h0 = img.size
    if w0 <= 0 or h0 <= 0:
        raise InvalidImage(f"the image has an empty size {w0}x{h0}")
    if max_pixels is not None and w0 * h0 > max_pixels:
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
        if orientation != 1:  # exif_transpose copies the image even when there is nothing to do
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        if color == "L":
            img = img.convert("L")
        img.load()
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"the image data is truncated or corrupt: {exc}") from None
    return DecodedImage(img, width, height, fmt)


def load_input(source: bytes | Path | str, spec: InputSpec, *, max_bytes: int | None = None,
               max_pixels: int | None = None) -> tuple[DecodedImage, np.ndarray, Geometry]:
    """:func:`load_image`, then resize to the model input ``spec``: what a model is fed.

    Returns the decoded image, the uint8 [H, W, channels] input array and the Geometry that maps
    model-input coordinates back to the original image.
    """
    decoded = load_image(source, max_bytes=max_bytes, max_pixels=max_pixels, draft_to=max(spec.width, spec.height),
                         color=spec.color)
    arr, geometry = resize_to_input(decoded.image, spec, orig_size=(decoded.width, decoded.height))
    return decoded, arr, geometry


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha over white; 16-bit grey scaled 65535 -> 255."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_wide_to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit and 32-bit grey to 8 bits: integer images in 0..65535 (16-bit PNG/TIFF) are
    scaled by 255/65535; float images in 0..1 by 255; anything else is min-max stretched."""
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if arr.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        return np.round(a * (255.0 / 65535.0)).astype(np.uint8)
    if arr.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return np.round(a * 255.0).astype(np.uint8)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _read(path: Path, max_bytes: int | None) -> bytes:
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise ImageTooLarge(f"{path} is {size} bytes; the limit is {max_bytes}")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidImage(f"{path}: cannot be read ({exc.strerror or exc})") from None
