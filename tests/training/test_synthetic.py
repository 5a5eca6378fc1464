from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.files import tree_digest
from training.synthetic import SHAPES, write_classification, write_detection, write_segmentation


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    for writer in (write_classification, write_detection, write_segmentation):
        writer(tmp_path / "a", 6, seed=3)
        writer(tmp_path / "b", 6, seed=3)
        writer(tmp_path / "c", 6, seed=4)
        assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
        assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
        for d in "abc":
            import shutil
            shutil.rmtree(tmp_path / d)


def test_imagefolder_layout(tmp_path: Path) -> None:
    write_classification(tmp_path, 10, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SHAPES)
    assert sum(1 for _ in tmp_path.rglob("*.jpg")) == 10
    for f in tmp_path.rglob("*.jpg"):
        assert Image.open(f).mode == "RGB"


def test_coco_file_is_valid_for_pycocotools(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    from core.metrics import load_coco

    write_detection(tmp_path, 8, seed=0)
    coco = load_coco(str(tmp_path / "annotations.json"))
    assert len(coco.getImgIds()) == 8
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns, "scenes must contain shapes"
    for a in anns:
        img = coco.loadImgs(a["image_id"])[0]
        m = coco.annToMask(a)
        assert m.shape == (img["height"], img["width"])
        assert m.sum() == a["area"]
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1 - x, ys.max() + 1 - y) == (x, y, w, h)
        assert mask_utils.area(a["segmentation"]) == a["area"]


def test_segmentation_pairs(tmp_path: Path) -> None:
    write_segmentation(tmp_path, 6, seed=0)
    classes = (tmp_path / "classes.txt").read_text().split()
    assert classes == ["background", *SHAPES]
    for img in (tmp_path / "images").iterdir():
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{img.stem}.png"))
        assert mask.shape == Image.open(img).size[::-1]
        assert mask.max() < len(classes) and (mask > 0).any()


def test_instance_scenes_hold_touching_objects_of_one_class(tmp_path) -> None:
    """What semantic segmentation cannot separate: two shapes of one class whose visible
    masks touch (one pixel apart at most), each its own annotation."""
    from core.metrics import load_coco
    from training.synthetic import write_instances

    write_instances(tmp_path, 30, seed=2)
    coco = load_coco(str(tmp_path / "annotations.json"))
    touching = 0
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        masks = [(a["category_id"], coco.annToMask(a).astype(bool)) for a in anns]
        for i, (ci, mi) in enumerate(masks):
            grown = _grown(mi, 2)
            touching += sum(1 for cj, mj in masks[i + 1:] if cj == ci and (grown & mj).any())
    assert touching >= 10, touching


def _grown(mask, pixels: int):
    """``mask`` dilated by ``pixels`` (a square neighbourhood)."""
    import numpy as np

    padded = np.pad(mask, pixels)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out
