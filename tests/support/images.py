"""Synthetic request images with known content, and the one IoU helper."""

from __future__ import annotations

import io
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
