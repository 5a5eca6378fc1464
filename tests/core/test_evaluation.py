"""core.evaluation with hand-written predictors: the loop, the scorers and skipping, no model."""

from pathlib import Path

import numpy as np
from PIL import Image

from core.contract import ModelContract
from core.evaluation import evaluate

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _folder(root: Path) -> Path:
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 30), colour).save(root / name / f"{i}.png")
    return root


def _contract(labels: list[str], batch: dict | None = None) -> ModelContract:
    return ModelContract.from_dict({"task": "classification", "labels": labels,
                                    "input": {"name": "images", "height": 8, "width": 8},
                                    "outputs": {"kind": "logits", "scores": "logits"},
                                    **({"batch": batch} if batch else {})})


def _by_colour(labels: list[str]):
    calls: list[int] = []

    def predict(images: np.ndarray) -> list[dict[str, np.ndarray]]:
        calls.append(len(images))
        mean = images.reshape(len(images), -1, 3).mean(1)
        logits = np.zeros((len(images), len(labels)), np.float32)
        for i, m in enumerate(mean):
            logits[i, labels.index(["red", "green", "blue"][int(np.argmax(m))])] = 5.0
        return [{"logits": row} for row in logits]

    return predict, calls


def test_a_perfect_predictor_scores_one_and_labels_map_by_name(tmp_path: Path) -> None:
    labels = ["blue", "green", "red", "other"]  # the model's label order differs from the folders'
    predict, calls = _by_colour(labels)
    got = evaluate(predict, _contract(labels), _folder(tmp_path), batch_size=4)
    assert got["top1"] == 1.0 and got["images"] == 9 and calls == [4, 4, 1]


def test_a_wrong_predictor_scores_zero(tmp_path: Path) -> None:
    labels = ["blue", "green", "red"]
    predict, _ = _by_colour(list(reversed(labels)))  # names the wrong classes
    got = evaluate(lambda x: [{"logits": o["logits"]} for o in predict(x)], _contract(labels), _folder(tmp_path))
    assert got["top1"] == 3 / 9  # only green, in the middle, stays right


def test_a_fixed_batch_model_gets_batches_of_its_size(tmp_path: Path) -> None:
    labels = ["blue", "green", "red"]
    predict, calls = _by_colour(labels)
    got = evaluate(predict, _contract(labels, {"dynamic": False, "size": 2}), _folder(tmp_path), batch_size=16)
    assert got["top1"] == 1.0 and calls == [2, 2, 2, 2, 1]
