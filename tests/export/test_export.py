import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.contract import METADATA_KEY, ModelContract
from core.errors import ContractError
from core.runtime import OnnxModel
from core.tasks import TASKS
from export.evaluate import evaluate
from export.onnx_export import export
from export.parity import ParityError, check_parity, sample_batch
from training.models import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,task", [("tiny-cls", "classification"), ("tiny-seg", "segmentation"),
                                       ("tiny-det", "detection")])
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
    model = load_checkpoint(tiny_checkpoints[task])[0]
    path = tiny_repo / f"tiny-{sub}" / "1" / "model.onnx"
    contract = OnnxModel.load(path, "x", "1", "cpu", 1).contract
    report = check_parity(model, path, contract, tiny_data / sub / "val", 4)
    assert report["images"] == 4
    with torch.no_grad():  # the same graph against a perturbed PyTorch model must fail
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    with pytest.raises(ParityError):
        check_parity(model, path, contract, tiny_data / sub / "val", 4)


@pytest.mark.parametrize("task,sub", [("classification", "cls"), ("segmentation", "seg"), ("detection", "det")])
def test_provenance_metrics_are_what_export_evaluate_reports(tiny_checkpoints, tiny_repo, tiny_data, task, sub) -> None:
    """Training validated the module that became the graph with core.evaluation; scoring the
    ONNX file on the same validation set gives the same figures (to float32 rounding)."""
    path = tiny_repo / f"tiny-{sub}" / "1" / "model.onnx"
    recorded = OnnxModel.load(path, "x", "1", "cpu", 1).contract.provenance["metrics"]
    assert recorded == torch.load(tiny_checkpoints[task], weights_only=True)["metrics"]
    measured = evaluate(path, tiny_data / sub / "val")
    assert measured["images"] == recorded["images"] == 8 if task != "classification" else 15
    for key, value in recorded.items():
        if isinstance(value, float):
            assert measured[key] == pytest.approx(value, abs=1e-4), key
    if task == "detection":
        assert measured["detections"] == recorded["detections"]


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


@pytest.mark.parametrize("task,sub,size", [("classification", "cls", 1), ("classification", "cls", 3),
                                           ("segmentation", "seg", 1), ("segmentation", "seg", 3)])
def test_fixed_batch_export_evaluates_like_the_dynamic_one(tiny_checkpoints, tiny_repo, tiny_data, tmp_path,
                                                           task, sub, size) -> None:
    path, report = export(tiny_checkpoints[task], f"fixed{size}", "1", tmp_path, "tiny", tiny_data / sub / "val", 4,
                          fixed_batch=size)
    model = OnnxModel.load(path, "f", "1", "cpu", 2)
    c = model.contract
    assert not c.batch.dynamic and c.batch.size == size and report["images"] == 4
    inputs = model.session.get_inputs()
    assert inputs[0].shape[0] == size
    images = sample_batch(tiny_data / sub / "val", c, 5)
    fixed = model.infer(images)  # 5 images through a graph of `size`: chunks, the last one padded
    dynamic = OnnxModel.load(tiny_repo / f"tiny-{sub}" / "1" / "model.onnx", "d", "1", "cpu", 2).infer(images)
    assert len(fixed) == len(dynamic) == 5
    name = c.outputs.tensor_names()[0]
    for a, b in zip(fixed, dynamic):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-3)
    metric = TASKS[task].metric
    fixed_score = evaluate(path, tiny_data / sub / "val")[metric]
    assert fixed_score == pytest.approx(evaluate(tiny_repo / f"tiny-{sub}" / "1" / "model.onnx",
                                                 tiny_data / sub / "val")[metric], abs=1e-3)


def test_export_cli_and_evaluate_cli(tiny_checkpoints, tiny_data, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "export.onnx_export", str(tiny_checkpoints["segmentation"]),
                        "--name", "seg", "--version", "7", "--models-dir", str(tmp_path), "--parity-data",
                        str(tiny_data / "seg" / "val"), "--parity-images", "4"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model"] == str(tmp_path / "seg" / "7" / "model.onnx") and out["parity"]["argmax_agreement"] >= 0.999
    assert sorted(p.name for p in (tmp_path / "seg" / "7").iterdir()) == ["model.onnx"]  # no staging file left
    r = subprocess.run([sys.executable, "-m", "export.evaluate", out["model"],
                        "--data", str(tiny_data / "seg" / "val")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert 0.0 <= metrics["miou"] <= 1.0 and set(metrics["iou"]) == {"background", "circle", "square", "triangle",
                                                                      "hexagon", "star"}


def test_evaluate_cli_names_a_wrong_dataset(tiny_repo, tiny_data) -> None:
    r = subprocess.run([sys.executable, "-m", "export.evaluate", str(tiny_repo / "tiny-seg" / "1" / "model.onnx"),
                        "--data", str(tiny_data / "cls" / "val")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(tiny_data / "cls" / "val" / "images") in r.stderr


@pytest.mark.slow
def test_torchvision_detector_trains_and_exports_as_a_batch_1_graph(tiny_data, tmp_path) -> None:
    from training.train import TrainConfig, train

    cfg = TrainConfig(task="detection", train=str(tiny_data / "det" / "train"), val=str(tiny_data / "det" / "val"),
                      arch="ssdlite320_mobilenet_v3_large", size=160, epochs=1, batch_size=4, workers=0, max_steps=2)
    train(cfg, tmp_path / "run")
    path, report = export(tmp_path / "run" / "best.pt", "ssd", "1", tmp_path / "models", "tiny",
                          tiny_data / "det" / "val", 4)
    assert report["unmatched_detections"] <= 0.02 * report["detections_compared"]
    model = OnnxModel.load(path, "ssd", "1", "cpu", 2)
    c = model.contract
    assert not c.batch.dynamic and c.batch.size == 1 and c.labels[0] == "__background__"
    x = sample_batch(tiny_data / "det" / "val", c, 2)
    out = model.run(x[:1])
    assert out["boxes"].ndim == 2 and out["boxes"].shape[1] == 4 and out["scores"].shape == out["labels"].shape
    with pytest.raises(Exception):  # noqa: B017 - ONNX Runtime's own error type (a pybind11 class) for a wrong shape
        model.run(x)  # two images: the graph takes exactly one
    per_image = model.infer(x)  # infer runs them one by one
    assert len(per_image) == 2 and per_image[0]["boxes"].ndim == 2
    metrics = evaluate(path, tiny_data / "det" / "val")
    assert 0 <= metrics["map"] <= metrics["map_50"] <= 1


def test_a_fixed_batch_cannot_be_asked_of_a_one_image_graph(tiny_data, tmp_path) -> None:
    from training.graph import graph_contract
    from training.models import build_model

    model = build_model("detection", "ssdlite320_mobilenet_v3_large", 5)
    with pytest.raises(ValueError, match="one image per call"):
        graph_contract(model, "detection", ["a", "b", "c", "d", "e"], 160, fixed_batch=4)
    assert graph_contract(model, "detection", list("abcde"), 160).batch.size == 1
    with pytest.raises(ContractError):
        graph_contract(build_model("classification", "mobilenet_v3_small", 2), "classification", ["a", "a"], 64)
