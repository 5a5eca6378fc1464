
import numpy as np
import torch

from export.evaluate import evaluate
from export.onnx_export import load_checkpoint
from training.datasets import ImageFolderDataset
from training.metrics import ClassificationMeter


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
