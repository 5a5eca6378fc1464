"""core.postprocess's instance masks: RLE from a window equals pycocotools' RLE of the whole
image, and masks come back at the original size inside their boxes."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from core.contract import InputSpec
from core.geometry import Geometry
from core.postprocess import encode_rle, encode_rle_window, instance_detections


@pytest.mark.parametrize("top,left,h,w", [(0, 0, 5, 7), (3, 4, 6, 2), (10, 12, 6, 8), (0, 19, 16, 1), (4, 4, 0, 0)])
def test_window_rle_equals_the_whole_image_rle(top: int, left: int, h: int, w: int) -> None:
    rng = np.random.default_rng(top * 31 + left)
    window = rng.random((h, w)) > 0.5
    if window.size:
        window[0, 0] = window[-1, -1] = True  # runs that touch the window's corners
    full = np.zeros((16, 20), bool)
    full[top:top + h, left:left + w] = window
    got = encode_rle_window(window, top, left, 16, 20)
    assert got == encode_rle(full)
    np.testing.assert_array_equal(mask_utils.decode({"size": got["size"], "counts": got["counts"].encode()}), full)


def test_instance_masks_are_at_the_original_size_inside_their_boxes() -> None:
    """A 40x20 image letterboxed into 16x16 (scale 0.4, content 16x8): one detection whose mask
    grid (8x8, half the input) is 1 over the left half of its box."""
    spec = InputSpec(name="images", height=16, width=16, resize="letterbox")
    geo = Geometry(40, 20, 0.4, 0.4, 16, 8)
    masks = np.zeros((2, 8, 8), np.float32)
    masks[0, :, 0:4] = 1.0  # input columns 0..8 -> original 0..20 (the rows below the content: padding)
    boxes = np.array([[0, 0, 16, 8], [0, 0, 1, 1]], np.float32)  # input pixels: the whole content
    found = instance_detections(boxes, np.array([0.9, 0.1], np.float32), np.array([1, 0]), masks, geo, spec,
                                ["bg", "thing"], 0.3, 10, "rle")
    (d,) = found
    assert d["box"] == [0.0, 0.0, 40.0, 20.0] and d["label"] == "thing"
    m = mask_utils.decode({"size": d["rle"]["size"], "counts": d["rle"]["counts"].encode()})
    assert m.shape == (20, 40) and d["area"] == int(m.sum())
    assert m[:, :19].all() and not m[:, 21:].any()  # the edge at x = 20 original px, within a pixel
    (png,) = instance_detections(boxes, np.array([0.9, 0.1], np.float32), np.array([1, 0]), masks, geo, spec,
                                 ["bg", "thing"], 0.3, 10, "png")
    assert png["mask_box"] == [0, 0, 40, 20] and png["area"] == d["area"]
    (poly,) = instance_detections(boxes, np.array([0.9, 0.1], np.float32), np.array([1, 0]), masks, geo, spec,
                                  ["bg", "thing"], 0.3, 10, "polygon")
    xs = poly["polygons"][0][0::2]
    assert min(xs) == 0 and 18 <= max(xs) <= 20
