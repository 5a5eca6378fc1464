import numpy as np
import pytest

from core.geometry import Geometry
from core.tasks import TASKS
from tests.support.models import contract


def test_split_with_and_without_a_batch_axis() -> None:
    task = TASKS["segmentation"]
    c = contract("segmentation", {"kind": "mask_logits", "masks": "m"})
    batch = {"m": np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)}
    per_image = task.split(batch, 2, c.outputs)
    assert [p["m"].shape for p in per_image] == [(3, 4, 4), (3, 4, 4)]
    assert np.array_equal(per_image[1]["m"], batch["m"][1])
    alone = task.split({"m": batch["m"][0]}, 1, c.outputs)  # a fixed batch of 1 without the batch axis
    assert np.array_equal(alone[0]["m"], batch["m"][0])
    padded = task.split(batch, 1, c.outputs)  # a padded fixed batch: only the real images come back
    assert len(padded) == 1 and np.array_equal(padded[0]["m"], batch["m"][0])
    with pytest.raises(ValueError, match="rank 3 per image"):
        task.split({"m": batch["m"][0]}, 2, c.outputs)


def test_results_per_task() -> None:
    geo = Geometry(16, 8, 0.5, 1.0, 8, 8)
    cls = contract("classification", {"kind": "logits", "scores": "s"})
    labels = TASKS["classification"].result({"s": np.array([0.0, 2.0, 1.0])}, geo, cls, {"top_k": 2})["labels"]
    assert [x["label"] for x in labels] == ["a", "b"] and labels[0]["score"] > labels[1]["score"]
    det = contract("detection", {"kind": "boxes", "boxes": "b", "scores": "s", "labels": "l"})
    out = {"b": np.array([[1, 1, 3, 3], [0, 0, 8, 8]], np.float32), "s": np.array([0.9, 0.2], np.float32),
           "l": np.array([2, 1])}
    found = TASKS["detection"].result(out, geo, det, {"score_threshold": 0.3, "max_detections": 10})["detections"]
    assert found == [{"box": [2.0, 1.0, 6.0, 3.0], "score": 0.9, "label": "b", "label_id": 2}]
    seg = contract("segmentation", {"kind": "class_map", "masks": "m"})
    cmap = np.zeros((8, 8), np.int64)
    cmap[2:4, 2:6] = 1
    res = TASKS["segmentation"].result({"m": cmap}, geo, seg, {"mask_format": "rle"})
    (only,) = res["classes"]
    assert only["label"] == "a" and only["area"] == 2 * 8 and only["bbox"] == [4, 2, 12, 4]


def _compared_names(path, names: set[str]) -> list[str]:
    """Where ``path`` compares a value with one of ``names`` (==, !=, in/not in a literal
    collection, a match case): behaviour chosen by testing a name instead of by table lookup."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        literals: list[ast.AST] = []
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                literals += operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
        elif isinstance(node, ast.MatchValue):
            literals.append(node.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
            literals += node.args
        hits = [n.value for n in literals if isinstance(n, ast.Constant) and n.value in names]
        found += [f"{path.name}:{node.lineno}: {h!r}" for h in hits]
    return found


def test_no_task_endpoint_or_architecture_name_is_compared_anywhere(tmp_path) -> None:
    """Tasks, endpoints and architectures are chosen by looking them up in their tables
    (core.tasks.TASKS, service.endpoints.ENDPOINTS, training.models.ARCHITECTURES), never by
    comparing names: adding one touches its declaration, not every place that branches."""
    from pathlib import Path

    from service.endpoints import ENDPOINTS
    from training.models import ARCHITECTURES

    names = set(TASKS) | set(ENDPOINTS) | {a for archs in ARCHITECTURES.values() for a in archs}
    root = Path(__file__).resolve().parents[2]
    found = [hit for package in ("core", "service", "training", "export", "loadtest")
             for path in sorted((root / package).rglob("*.py")) for hit in _compared_names(path, names)]
    assert not found, found
    probe = tmp_path / "probe.py"  # the scan finds each form it looks for
    probe.write_text('if a == "lenet5": pass\nif t in ("detection", "x"): pass\n'
                     'ok = a.startswith("centernet_mobilenet_v3_small")\n'
                     'match t:\n    case "classify": pass\nTABLE = {"lenet5": 1}\n')
    assert [h.split(": ")[1] for h in _compared_names(probe, names)] == [
        "'lenet5'", "'detection'", "'centernet_mobilenet_v3_small'", "'classify'"]


def _keypoint_contract():
    from core.contract import ModelContract

    return ModelContract.from_dict({
        "task": "keypoints", "labels": ["figure", "robot"], "input": {"name": "images", "height": 8, "width": 8},
        "outputs": {"kind": "boxes", "boxes": "b", "scores": "s", "labels": "l", "keypoints": "k"},
        "keypoints": {"names": ["head", "left_hand", "right_hand"], "skeleton": [[0, 1], [0, 2]],
                      "sigmas": [0.05, 0.05, 0.05]}})


def test_keypoint_results_are_in_original_pixels_best_object_first() -> None:
    geo = Geometry(16, 8, 0.5, 1.0, 8, 8)  # original 16x8 squeezed to 8x8: x halves
    out = {"b": np.array([[1, 1, 3, 3], [0, 0, 8, 8], [0, 0, 1, 1]], np.float32),
           "s": np.array([0.4, 0.9, 0.1], np.float32), "l": np.array([0, 1, 0]),
           "k": np.array([[[2, 1, 0.8], [3, 2, 0.4], [9, 1, 0.9]],
                          [[1, 1, 0.5], [2, 2, 0.25], [3, 3, 1.5]],
                          [[0, 0, 1], [0, 0, 1], [0, 0, 1]]], np.float32)}
    found = TASKS["keypoints"].result(out, geo, _keypoint_contract(), {"score_threshold": 0.3,
                                                                       "max_detections": 10})["detections"]
    assert [(d["label"], d["score"], d["box"]) for d in found] == [("robot", 0.9, [0.0, 0.0, 16.0, 8.0]),
                                                                    ("figure", 0.4, [2.0, 1.0, 6.0, 3.0])]
    assert found[1]["keypoints"] == [{"name": "head", "x": 4.0, "y": 1.0, "score": 0.8},
                                     {"name": "left_hand", "x": 6.0, "y": 2.0, "score": 0.4},
                                     {"name": "right_hand", "x": 16.0, "y": 1.0, "score": 0.9}]  # clipped to 16
    assert found[0]["keypoints"][2]["score"] == 1.0  # a confidence is at most 1


def test_keypoint_answers_convert_to_coco_results_pycocotools_scores() -> None:
    """A ground truth written by hand; the answer for it scores OKS AP 1.0 and one with the
    keypoints moved far scores 0, through pycocotools' own COCOeval."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from core.metrics import coco_keypoint_metrics
    from core.tasks import coco_keypoint_results

    kps = [[20.0, 10.0], [12.0, 30.0], [28.0, 30.0]]
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 40, "height": 40}],
                  "categories": [{"id": 3, "name": "figure", "keypoints": ["head", "left_hand", "right_hand"]}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [10, 5, 20, 30],
                                   "area": 600.0, "num_keypoints": 3,
                                   "keypoints": [v for x, y in kps for v in (x, y, 2)]}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    answer = [{"box": [10.0, 5.0, 30.0, 35.0], "score": 0.9, "label": "figure", "label_id": 0,
               "keypoints": [{"name": n, "x": x, "y": y, "score": 0.7}
                             for n, (x, y) in zip(["head", "left_hand", "right_hand"], kps)]}]
    right = coco_keypoint_metrics(gt, coco_keypoint_results(1, 3, answer), [1], [0.05, 0.05, 0.05])
    assert right["oks_ap"] == pytest.approx(1.0)
    for k in answer[0]["keypoints"]:
        k["x"] += 8
    wrong = coco_keypoint_metrics(gt, coco_keypoint_results(1, 3, answer), [1], [0.05, 0.05, 0.05])
    assert wrong["oks_ap_50"] == 0.0
