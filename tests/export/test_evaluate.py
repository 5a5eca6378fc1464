import logging

import numpy as np
import torch

from core.metrics import ClassificationMeter
from export.evaluate import evaluate
from training.datasets import ImageFolderDataset
from training.models import load_checkpoint


def test_evaluate_classifier_matches_pytorch_on_the_same_images(tiny_repo, tiny_checkpoints, tiny_data) -> None:
    got = evaluate(tiny_repo / "tiny-cls" / "1" / "model.onnx", tiny_data / "cls" / "val")
    model, cfg, _ = load_checkpoint(tiny_checkpoints["classification"])
    ds = ImageFolderDataset(tiny_data / "cls" / "val", (cfg["size"], cfg["size"]), classes=cfg["classes"])
    meter = ClassificationMeter(len(ds.classes))
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = ds[i]
            meter.update(model(x[None]).numpy(), np.array([y]))
    assert got["images"] == 15 and got["top1"] == meter.compute()["top1"]


def test_evaluate_detector_and_segmenter_report_their_metrics(tiny_repo, tiny_data) -> None:
    det = evaluate(tiny_repo / "tiny-det" / "1" / "model.onnx", tiny_data / "det" / "val")
    assert set(det) >= {"map", "map_50", "map_75"} and 0 <= det["map"] <= det["map_50"] <= 1
    seg = evaluate(tiny_repo / "tiny-seg" / "1" / "model.onnx", tiny_data / "seg" / "val")
    assert 0 <= seg["miou"] <= 1 and seg["iou"]["background"] is not None


def test_evaluate_skips_files_that_are_not_images_with_a_warning(tiny_repo, tiny_data, tmp_path, caplog) -> None:
    import shutil

    root = shutil.copytree(tiny_data / "cls" / "val", tmp_path / "cls")
    (root / "circle" / "README.txt").write_text("notes, not an image")
    (root / "star" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with caplog.at_level(logging.WARNING):
        got = evaluate(tiny_repo / "tiny-cls" / "1" / "model.onnx", root)
    assert got["images"] == 15
    text = caplog.text
    assert "README.txt" in text and "broken.jpg" in text
