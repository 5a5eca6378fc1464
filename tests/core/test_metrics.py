import numpy as np
import pytest

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


def test_retrieval_metrics_by_hand() -> None:
    """Four images of two identities on a line: each query's ranking worked out on paper."""
    from core.metrics import retrieval_metrics

    angles = np.array([0.0, 0.1, 0.25, 1.0])  # identities a, a, b, b
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    m = retrieval_metrics(x, np.array([0, 0, 1, 1]), ks=(1, 2))
    # nearest: 0->1 (hit), 1->0 (hit), 2->1 (miss; then 0, then 3), 3->2 (hit)
    assert m["recall_at_1"] == 0.75 and m["recall_at_2"] == 0.75 and m["queries"] == 4
    assert m["map_at_r"] == 0.75  # R = 1 for every query: AP@R is the top-1 hit


def test_retrieval_metrics_equal_pytorch_metric_learning() -> None:
    """The field's implementation (pytorch-metric-learning's AccuracyCalculator, exact k-NN) on
    random clustered embeddings: precision@1 is recall@1 for leave-one-out, and mAP@R the same."""
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    from core.metrics import retrieval_metrics

    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(40), rng.integers(2, 7, 40))
    centres = rng.normal(size=(40, 16))
    x = (centres[ids] + rng.normal(scale=0.9, size=(len(ids), 16))).astype(np.float32)
    ours = retrieval_metrics(x, ids)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              knn_func=CustomKNN(CosineSimilarity()))
    theirs = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(ids))
    assert 0.2 < ours["recall_at_1"] < 0.95  # neither trivial nor hopeless
    assert ours["recall_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
