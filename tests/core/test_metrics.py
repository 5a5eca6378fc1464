import numpy as np

from core.metrics import ConfusionMatrix, coco_detection_metrics, load_coco, topk_correct


def test_topk() -> None:
    s = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert topk_correct(s, np.array([1, 2]), 1) == 1
    assert topk_correct(s, np.array([1, 2]), 2) == 2


def test_confusion_matrix_iou() -> None:
    cm = ConfusionMatrix(3)
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1]])
    cm.update(pred, target)
    r = cm.compute(["bg", "a", "b"])
    assert r["iou"]["bg"] == 0.75 and r["iou"]["a"] == 0.8 and r["iou"]["b"] is None
    assert abs(r["miou"] - 0.775) < 1e-9


def test_coco_map_perfect_and_wrong(tiny_data) -> None:
    coco = load_coco(str(tiny_data / "det" / "val" / "annotations.json"))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in coco.loadAnns(coco.getAnnIds())]
    assert coco_detection_metrics(coco, perfect)["map"] > 0.99
    shifted = [{**d, "bbox": [d["bbox"][0] + 2 * d["bbox"][2], *d["bbox"][1:]]} for d in perfect]
    assert coco_detection_metrics(coco, shifted)["map_50"] < 0.05
