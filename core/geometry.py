"""Resizing an RGB image to a model's uint8 input, and mapping results back.

``stretch`` resizes to the input size; ``letterbox`` keeps the aspect ratio and pads at the
bottom/right with the contract's pad value, so mapping a point back to the original image is
one division per axis. Both resize with Pillow's bilinear filter (``reducing_gap=3``: a box
pre-reduction for large downscales, then bilinear).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.contract import InputSpec


@dataclass(frozen=True)
class Geometry:
    """How original image pixels map to model-input pixels: x_in = x_orig * scale_x."""

    orig_width: int
    orig_height: int
    scale_x: float
    scale_y: float
    content_width: int   # model-input pixels covered by the image (the rest is padding)
    content_height: int

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map [K, 4] xyxy boxes from model-input to original pixels, clipped to the image."""
        out = boxes.astype(np.float32, copy=True).reshape(-1, 4)
        out[:, [0, 2]] /= self.scale_x
        out[:, [1, 3]] /= self.scale_y
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.orig_width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.orig_height)
        return out

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Map [K, 4] xyxy boxes from original to model-input pixels (training targets)."""
        out = boxes.astype(np.float32, copy=True).reshape(-1, 4)
        out[:, [0, 2]] *= self.scale_x
        out[:, [1, 3]] *= self.scale_y
        return out


def resize_to_input(img: Image.Image, spec: InputSpec, orig_size: tuple[int, int] | None = None,
                    ) -> tuple[np.ndarray, Geometry]:
    """Resize ``img`` (RGB, or L for one channel) to the ``spec.height x spec.width x spec.channels``
    uint8 model input.

    ``orig_size`` is the client's image size when ``img`` was decoded at a reduced scale
    (JPEG draft); the returned Geometry always maps to the original size.
    """
    width, height = spec.width, spec.height
    ow, oh = orig_size or img.size
    if spec.resize == "stretch":
        arr = _hwc(np.asarray(img.resize((width, height), Image.BILINEAR, reducing_gap=3.0)))
        return arr, Geometry(ow, oh, width / ow, height / oh, width, height)
    if spec.resize != "letterbox":
        raise ValueError(f"unknown resize policy {spec.resize!r}")
    s = min(width / ow, height / oh)
    cw, ch = max(1, min(width, round(ow * s))), max(1, min(height, round(oh * s)))
    resized = _hwc(np.asarray(img.resize((cw, ch), Image.BILINEAR, reducing_gap=3.0)))
    arr = np.full((height, width, resized.shape[2]), spec.pad_value, np.uint8)
    arr[:ch, :cw] = resized
    return arr, Geometry(ow, oh, cw / ow, ch / oh, cw, ch)


def _hwc(arr: np.ndarray) -> np.ndarray:
    """[H, W] (a greyscale image) -> [H, W, 1]; [H, W, C] as it is."""
    return arr[:, :, None] if arr.ndim == 2 else arr


def resize_class_map(class_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Crop the padding off a model-input class map and resize it (nearest) to the original size."""
    crop = class_map[: geometry.content_height, : geometry.content_width].astype(np.uint8)
    pil = Image.fromarray(crop, "L").resize((geometry.orig_width, geometry.orig_height), Image.NEAREST)
    return np.asarray(pil)


def strips(size: tuple[int, int], pixels: int) -> Iterator[tuple[int, int]]:
    """(first row, end row) of the strips of about ``pixels`` pixels (whole rows, at least
    one) covering an image of ``size`` (width, height): work on a large image a strip at a
    time keeps its temporaries a few MB."""
    width, height = size
    rows = max(1, pixels // max(1, width))
    for y in range(0, height, rows):
        yield y, min(height, y + rows)
