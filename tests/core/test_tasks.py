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
