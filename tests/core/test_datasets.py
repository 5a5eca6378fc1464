"""core.datasets' COCO reader on hand-written annotation files: masks decoded from each of
COCO's three segmentation forms, and the errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.datasets import CocoDetection
from core.errors import DatasetError


def _write(root: Path, segmentations: list, size: tuple[int, int] = (12, 10)) -> Path:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", size, (90, 90, 90)).save(root / "images" / "a.png")
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 0, "segmentation": s}
            for i, s in enumerate(segmentations)]
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]}], "annotations": anns,
           "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def test_masks_from_polygons_uncompressed_and_compressed_rle(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    want = np.zeros((10, 12), np.uint8)
    want[2:6, 3:9] = 1  # rows 2..5, columns 3..8
    compressed = mask_utils.encode(np.asfortranarray(want))
    compressed["counts"] = compressed["counts"].decode()
    counts, flat, run, value = [], want.reshape(-1, order="F"), 0, 0  # column-major runs, zeros first
    for v in flat:
        if v != value:
            counts.append(run)
            run, value = 0, v
        run += 1
    counts.append(run)
    polygon = [[3, 2, 9, 2, 9, 6, 3, 6]]  # the rectangle's outline, in pixel corners
    data = CocoDetection(_write(tmp_path, [compressed, {"size": [10, 12], "counts": counts}, polygon]))
    (sample,) = data.samples
    masks = data.load_masks(sample.target, (12, 10))
    assert masks.shape == (3, 10, 12)
    np.testing.assert_array_equal(masks[0], want)
    np.testing.assert_array_equal(masks[1], want)
    assert (masks[2] == want).mean() > 0.9  # a polygon's rasterisation rounds its edges


def test_a_mask_of_another_size_and_objects_without_masks_are_named(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    other = mask_utils.encode(np.asfortranarray(np.ones((5, 5), np.uint8)))
    other["counts"] = other["counts"].decode()
    data = CocoDetection(_write(tmp_path / "a", [other]))
    with pytest.raises(DatasetError, match=r"a mask of size \[5, 5\], the image is \[10, 12\]"):
        data.load_masks(data.samples[0].target, (12, 10))
    bare = CocoDetection(_write(tmp_path / "b", [[]]))
    with pytest.raises(DatasetError, match="objects without a 'segmentation'"):
        bare.load_masks(bare.samples[0].target, (12, 10))
