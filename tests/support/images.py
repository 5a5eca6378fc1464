"""Synthetic request images with known content (scenes; 100 MP 16-bit PNGs and float TIFFs
written by hand, small on disk), and the one IoU helper."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from training.synthetic import Scene, render_scene


def jpeg(img: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def scene(seed: int, width: int = 320, height: int = 240, shapes: int = 4) -> Scene:
    rng = np.random.default_rng(seed)
    m = min(width, height)
    return render_scene(rng, width, height, shapes, 0.08 * m, 0.2 * m)


def iou(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2], or of two boolean masks of one shape;
    0 when the union is empty."""
    if isinstance(a, np.ndarray) and a.dtype == bool:
        inter, union = int((a & b).sum()), int((a | b).sum())
    else:
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def grey16_png(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG written by hand: a ramp over 0..65535 along each row, with a
    60000 square in the middle third; repeated rows are "Up"-filtered zeros, so a 10000x10000
    one is 275 KB and takes 0.6 s to build (Pillow would hold and encode 200 MB)."""
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // max(1, width - 1)).astype(">u2")
    square = ramp.copy()
    square[width // 3: 2 * width // 3] = 60000
    z, idat, up = zlib.compressobj(6), [], b"\x02" + bytes(2 * width)
    third = height // 3
    for y0, y1, row in ((0, third, ramp), (third, 2 * third, square), (2 * third, height, ramp)):
        if y1 > y0:
            idat += [z.compress(b"\x00" + row.tobytes())] + [z.compress(up) for _ in range(y1 - y0 - 1)]
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(idat) + z.flush())
            + _png_chunk(b"IEND", b""))


def float_tiff(width: int, height: int, rows_per_strip: int = 16) -> bytes:
    """A 32-bit float greyscale TIFF written by hand in deflate strips: row y is y/height,
    with a 2.0 bar in the middle third (so it is min-max stretched); 10000x10000 is ~0.5 MB."""
    strips = []
    for y0 in range(0, height, rows_per_strip):
        rows = np.arange(y0, min(height, y0 + rows_per_strip))
        block = np.repeat((rows / height).astype("<f4")[:, None], width, axis=1)
        block[(rows >= height // 3) & (rows < 2 * height // 3), width // 3: 2 * width // 3] = 2.0
        data = zlib.compress(block.tobytes(), 6)
        strips.append(data + bytes(len(data) & 1))  # word-aligned
    n, offsets = len(strips), np.cumsum([8] + [len(d) for d in strips])
    sizes = [len(d) for d in strips]
    at = int(offsets[-1])  # the offsets and byte counts arrays, then the IFD
    inline = n == 1
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 32), (259, 3, 1, 8), (262, 3, 1, 1),
            (273, 4, n, 8 if inline else at), (277, 3, 1, 1), (278, 4, 1, rows_per_strip),
            (279, 4, n, sizes[0] if inline else at + 4 * n), (339, 3, 1, 3)]  # 339: IEEE float samples
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, kind, count, v) if kind == 4 else struct.pack("<HHIHH", tag, kind, count, v, 0)
        for tag, kind, count, v in tags) + struct.pack("<I", 0)
    arrays = b"" if inline else struct.pack(f"<{n}I", *offsets[:-1]) + struct.pack(f"<{n}I", *sizes)
    return b"II*\x00" + struct.pack("<I", at + len(arrays)) + b"".join(strips) + arrays + ifd
