"""int8 variants (export.quantize) of the shipped classifier: written only when they score
like the fp32 model, and a contract that says what they are."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from core.onnx_contract import read_contract
from export.evaluate import evaluate
from export.quantize import QuantizationError, quantize
from training.synthetic import write_classification

pytestmark = pytest.mark.slow  # quantizes and evaluates the shipped classifier

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "models" / "shapes-classifier" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 images the shipped classifier never saw (seed 7 is the README's fresh set)."""
    root = tmp_path_factory.mktemp("fresh")
    write_classification(root, 200, seed=7)
    return root


def test_int8_variant_scores_like_fp32_and_says_so(tiny_data: Path, fresh: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo" / "shapes-classifier" / "2" / "model.onnx"
    report = quantize(SOURCE, out, tiny_data / "cls" / "train", fresh, images=40)
    fp32, int8 = evaluate(SOURCE, fresh)["top1"], evaluate(out, fresh)["top1"]
    assert fp32 >= 0.95 and int8 >= fp32 - 0.01, (fp32, int8)
    assert report["fp32"] == fp32 and report["int8"] == int8 and report["calibration_images"] == 40

    contract, source_contract = read_contract(out), read_contract(SOURCE)
    assert contract.precision == "int8" and source_contract.precision == "fp32"
    assert contract.input == source_contract.input and contract.outputs == source_contract.outputs
    assert contract.provenance["quantization"]["metric"] == "top1"
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in graph.output)
    assert out.stat().st_size < 0.5 * SOURCE.stat().st_size


def test_a_variant_that_scores_worse_than_allowed_is_not_written(tiny_data: Path, fresh: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo" / "shapes-classifier" / "2" / "model.onnx"
    with pytest.raises(QuantizationError, match="top1 fell from"):
        quantize(SOURCE, out, tiny_data / "cls" / "train", fresh, images=10, max_drop=-0.5)  # must gain 50 points
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_cli_refuses_an_int8_source(tiny_data: Path, fresh: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = tmp_path / "repo"
    quantize(SOURCE, repo / "c" / "2" / "model.onnx", tiny_data / "cls" / "train", fresh, images=10, max_drop=1)
    r = subprocess.run([sys.executable, "-m", "export.quantize", str(repo / "c" / "2" / "model.onnx"), "--calibration",
                        str(tiny_data / "cls" / "train"), "--eval", str(fresh), "--version", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "already int8" in r.stderr and "Traceback" not in r.stderr
    assert not (repo / "c" / "3").exists()
