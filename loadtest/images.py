"""A realistic request image mix, made here (no downloads): thumbnails to 12 MP photos, JPEG and PNG.

Sizes and shares: 160x120 (20%), 640x480 (40%), 1280x960 (20%), 1920x1080 (10%),
4000x3000 = 12 MP phone photo (10%); three JPEGs in four, one PNG in four (the 12 MP ones
are always JPEG, as phones write them). Deterministic for a given seed.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from training.synthetic import render_scene

MIX: tuple[tuple[int, int, float], ...] = (
    (160, 120, 0.2), (640, 480, 0.4), (1280, 960, 0.2), (1920, 1080, 0.1), (4000, 3000, 0.1),
)


def _render(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A scene rendered at most 640 px wide and upscaled: big photos without minutes of drawing."""
    s = min(1.0, 640 / width)
    w, h = max(32, int(width * s)), max(32, int(height * s))
    img = render_scene(rng, w, h, int(rng.integers(1, 5)), 0.08 * min(w, h), 0.25 * min(w, h)).image
    return img.resize((width, height), Image.BILINEAR) if (w, h) != (width, height) else img


def image_mix(count: int = 20, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """``count`` (filename, bytes, content type) following MIX's shares."""
    rng = np.random.default_rng(seed)
    sizes = [(w, h) for w, h, share in MIX for _ in range(max(1, round(share * count)))][:count]
    out = []
    for i, (w, h) in enumerate(sizes):
        img = _render(rng, w, h)
        buf = io.BytesIO()
        if i % 4 == 3 and w * h < 10_000_000:
            img.save(buf, format="PNG", compress_level=6)
            out.append((f"img{i}_{w}x{h}.png", buf.getvalue(), "image/png"))
        else:
            img.save(buf, format="JPEG", quality=90)
            out.append((f"img{i}_{w}x{h}.jpg", buf.getvalue(), "image/jpeg"))
    return out


def decompression_bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny compressed body: a hostile
    upload that must be refused from its header (a few hundred bytes claiming gigapixels)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
