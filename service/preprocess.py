"""Resizing an RGB image to a model's uint8 input, and mapping results back.

The same functions prepare training batches (training/), evaluation (export/evaluate) and
requests (service/), so what a model sees in production is exactly what it was trained on.
Letterboxing keeps the aspect ratio and pads at the bottom/right, so mapping a point back
to the original image is a single division per axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Geometry:
    """How original image pixels map to model-input pixels: x_in = x_orig * scale_x."""

    orig_width: int
    orig_height: int
    scale_x: float
    scale_y: float
    content_width: int   # model-input pixels covered by the image (rest is padding)
    content_height: int

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map [K, 4] xyxy boxes from model-input to original pixels, clipped to the image."""
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] /= self.scale_x
        out[:, [1, 3]] /= self.scale_y
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.orig_width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.orig_height)
        return out


def prepare(
    img: Image.Image,
    width: int,
    height: int,
    policy: str,
    pad_value: int = 114,
    orig_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, Geometry]:
    """Resize ``img`` (RGB) to ``height x width x 3`` uint8 by ``policy`` (stretch|letterbox).

    ``orig_size`` is the client's image size when ``img`` was decoded at reduced scale
    (JPEG draft); the returned Geometry always maps to the original size.
    """
    ow, oh = orig_size or img.size
    if policy == "stretch":
        arr = np.asarray(img.resize((width, height), Image.BILINEAR, reducing_gap=3.0))
        return arr, Geometry(ow, oh, width / ow, height / oh, width, height)
    if policy != "letterbox":
        raise ValueError(f"unknown resize policy {policy!r}")
    s = min(width / ow, height / oh)
    cw, ch = max(1, min(width, round(ow * s))), max(1, min(height, round(oh * s)))
    resized = np.asarray(img.resize((cw, ch), Image.BILINEAR, reducing_gap=3.0))
    arr = np.full((height, width, 3), pad_value, np.uint8)
    arr[:ch, :cw] = resized
    return arr, Geometry(ow, oh, cw / ow, ch / oh, cw, ch)


def resize_class_map(class_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Crop padding off a model-input class map and resize it (nearest) to the original size."""
    crop = class_map[: geometry.content_height, : geometry.content_width].astype(np.uint8)
    pil = Image.fromarray(crop, "L").resize((geometry.orig_width, geometry.orig_height), Image.NEAREST)
    return np.asarray(pil)
