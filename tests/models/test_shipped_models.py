"""Every model shipped in models/ obeys the contract, runs in ONNX Runtime, and scores what
the README claims on a fresh synthetic set (a seed never used for training or validation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.evaluate import evaluate
from service.onnx_meta import read_contract
from service.repository import discover
from service.runtime import OnnxModel
from training.synthetic import write_classification, write_detection, write_segmentation

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = discover(MODELS)
FRESH_SEED = 7  # training used seed 1, validation seed 2


def test_repository_is_small_and_complete() -> None:
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total < 15 * 1024 * 1024, f"models/ holds {total / 2**20:.1f} MiB"
    tasks = {read_contract(path).task for _, _, path in SHIPPED}
    assert tasks == {"classification", "detection", "segmentation"}


@pytest.mark.parametrize("name,version,path", SHIPPED, ids=[f"{n}:{v}" for n, v, _ in SHIPPED])
def test_shipped_model_obeys_contract_and_runs(name: str, version: str, path: Path) -> None:
    contract = read_contract(path)
    prov = contract.provenance
    for key in ("architecture", "dataset", "metrics", "exported_at", "checkpoint_sha256", "parity"):
        assert prov.get(key), f"{path}: provenance lacks {key}"
    model = OnnxModel.load(path, name, version, "cpu", 2)
    n = 3 if contract.batch.dynamic else 1
    batch = np.random.default_rng(0).integers(0, 256, (n, contract.input.height, contract.input.width, 3), np.uint8)
    out = model.run(batch)
    c, o = contract, contract.outputs
    if c.task == "classification":
        assert out[o.scores].shape == (n, len(c.labels))
    elif c.task == "segmentation":
        assert out[o.masks].shape == (n, len(c.labels), c.input.height, c.input.width)
    else:
        assert out[o.boxes].shape == (n, o.max_detections, 4)
        assert out[o.scores].shape == out[o.labels].shape == (n, o.max_detections)
        assert out[o.labels].max() < len(c.labels)


# Thresholds are the acceptance bars (README "Shipped models" has the measured figures).
BARS = {"classification": ("top1", 0.95), "segmentation": ("miou", 0.80), "detection": ("map_50", 0.85)}
WRITERS = {"classification": (write_classification, 200), "segmentation": (write_segmentation, 100),
           "detection": (write_detection, 100)}


@pytest.mark.parametrize("name,version,path", SHIPPED, ids=[f"{n}:{v}" for n, v, _ in SHIPPED])
def test_shipped_model_meets_its_bar_on_fresh_data(name: str, version: str, path: Path, tmp_path: Path) -> None:
    task = read_contract(path).task
    writer, count = WRITERS[task]
    writer(tmp_path / "data", count, seed=FRESH_SEED)
    metrics = evaluate(path, tmp_path / "data")
    key, bar = BARS[task]
    assert metrics[key] >= bar, metrics
