import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.imaging import decode_image

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 20_000_000}


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 40), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red square at top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    d = decode_image(_encode(img, "JPEG", exif=exif, quality=95), **LIMITS)
    assert (d.width, d.height) == (40, 60) and d.image.size == (40, 60)
    arr = np.asarray(d.image)
    assert arr[3, 36, 0] > 200 and arr[3, 3, 0] < 60  # top-left moved to top-right


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = Image.new(mode, (8, 6))
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG"
    d = decode_image(_encode(img, fmt), **LIMITS)
    assert d.image.mode == "RGB" and d.image.size == (8, 6)


def test_not_an_image_empty_and_truncated() -> None:
    with pytest.raises(InvalidImage, match="not an image"):
        decode_image(b"hello world", **LIMITS)
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", **LIMITS)
    data = _encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_byte_and_pixel_limits() -> None:
    data = _encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(data, max_bytes=10, max_pixels=10**9)
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode_image(data, max_bytes=10**9, max_pixels=5000)


def decompression_bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny compressed body."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = decompression_bomb_png(60000, 60000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match="60000x60000"):
        decode_image(bomb, **LIMITS)


def test_large_jpeg_is_drafted_but_reports_original_size() -> None:
    img = Image.new("RGB", (2000, 1200), (10, 200, 30))
    d = decode_image(_encode(img, "JPEG"), **LIMITS, draft_to=224)
    assert (d.width, d.height) == (2000, 1200)
    assert d.image.size[0] < 2000 and min(d.image.size) >= 224
