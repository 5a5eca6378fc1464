import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import export_module, load_checkpoint
from export.parity import ParityError, check_parity, sample_batch
from service.contract import METADATA_KEY, ModelContract
from service.runtime import OnnxModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,task", [("tiny-cls", "classification"), ("tiny-seg", "segmentation"), ("tiny-det", "detection")])
def test_exported_model_obeys_contract(tiny_repo: Path, name: str, task: str) -> None:
    path = tiny_repo / name / "1" / "model.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    doc = {p.key: p.value for p in proto.metadata_props}[METADATA_KEY]
    contract = ModelContract.from_json(doc)
    assert contract.task == task and contract.batch.dynamic
    assert contract.input.dtype == "uint8" and contract.input.normalized_in_graph
    prov = contract.provenance
    assert prov["architecture"] and len(prov["checkpoint_sha256"]) == 64 and prov["exported_at"]
    assert prov["parity"]["images"] == 8
    model = OnnxModel.load(path, name, "1", "cpu", 1)  # validates contract against the graph too
    assert model.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("task,sub", [("classification", "cls"), ("segmentation", "seg"), ("detection", "det")])
def test_parity_passes_and_detects_a_different_model(tiny_checkpoints, tiny_repo, tiny_data, task, sub) -> None:
    module, _ = export_module(load_checkpoint(tiny_checkpoints[task])[0], task)
    path = tiny_repo / f"tiny-{sub}" / "1" / "model.onnx"
    contract = OnnxModel.load(path, "x", "1", "cpu", 1).contract
    report = check_parity(module, path, contract, tiny_data / sub / "val", 4)
    assert report["images"] == 4
    with torch.no_grad():  # the same graph against a perturbed PyTorch model must fail
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    with pytest.raises(ParityError):
        check_parity(module, path, contract, tiny_data / sub / "val", 4)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_detector_batches_equal_single_images(tiny_repo: Path, tiny_data: Path, batch: int) -> None:
    model = OnnxModel.load(tiny_repo / "tiny-det" / "1" / "model.onnx", "d", "1", "cpu", 2)
    images = sample_batch(tiny_data / "det" / "val", model.contract, 8)[:batch]
    assert len(images) == batch
    together = model.run(images)
    assert together["boxes"].shape == (batch, 100, 4) and together["scores"].shape == (batch, 100)
    for i in range(batch):
        alone = model.run(images[i:i + 1])
        for k in ("boxes", "scores", "labels"):
            np.testing.assert_allclose(together[k][i], alone[k][0], rtol=1e-4, atol=1e-4)


def test_export_cli_and_evaluate_cli(tiny_checkpoints, tiny_data, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "export.onnx_export", str(tiny_checkpoints["segmentation"]),
                        "--name", "seg", "--version", "7", "--models-dir", str(tmp_path), "--parity-data",
                        str(tiny_data / "seg" / "val"), "--parity-images", "4"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model"] == str(tmp_path / "seg" / "7" / "model.onnx") and out["parity"]["argmax_agreement"] >= 0.999
    r = subprocess.run([sys.executable, "-m", "export.evaluate", out["model"], "--data", str(tiny_data / "seg" / "val")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert 0.0 <= metrics["miou"] <= 1.0 and set(metrics["iou"]) == {"background", "circle", "square", "triangle", "hexagon", "star"}


def test_torchvision_detector_trains_and_exports_as_a_batch_1_graph(tiny_data, tmp_path) -> None:
    from export.evaluate import evaluate
    from export.onnx_export import export
    from training.train import TrainConfig, train

    cfg = TrainConfig(task="detection", train=str(tiny_data / "det" / "train"), val=str(tiny_data / "det" / "val"),
                      arch="ssdlite320_mobilenet_v3_large", size=160, epochs=1, batch_size=4, workers=0, max_steps=2)
    train(cfg, tmp_path / "run")
    path, report = export(tmp_path / "run" / "best.pt", "ssd", "1", tmp_path / "models", "tiny", tiny_data / "det" / "val", 4)
    assert report["unmatched_detections"] <= 0.02 * report["detections_compared"]
    model = OnnxModel.load(path, "ssd", "1", "cpu", 2)
    c = model.contract
    assert not c.batch.dynamic and c.batch.size == 1 and c.labels[0] == "__background__"
    x = sample_batch(tiny_data / "det" / "val", c, 2)
    out = model.run(x[:1])
    assert out["boxes"].ndim == 2 and out["boxes"].shape[1] == 4 and out["scores"].shape == out["labels"].shape
    with pytest.raises(Exception):
        model.run(x)  # two images: the graph takes exactly one
    metrics = evaluate(path, tiny_data / "det" / "val")
    assert 0 <= metrics["map"] <= metrics["map_50"] <= 1
