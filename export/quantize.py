"""An int8 variant of an exported model for CPUs: static quantisation, calibrated on real images.

Usage::

    python -m export.quantize models/resnet18/1/model.onnx --calibration data/cls/train \\
        --eval data/cls/fresh --version 2

ONNX Runtime's ``quantize_static`` in QDQ format: convolutions and matrix products get
int8 weights (per output channel, symmetric) and uint8 activations (U8S8), with ranges
calibrated (MinMax) on ``--images`` images from ``--calibration``, each prepared exactly as
the service prepares an upload (core.imaging.load_input). Weights use 7 bits
(``reduce_range``) unless ``--full-range``: on CPUs without VNNI, U8S8 products of 8-bit
weights can saturate; 7 bits are exact everywhere and cost no speed. Everything else
(the uint8 input, the in-graph normalisation, softmax, decoding) stays float, so the
input stays uint8 NHWC, the outputs stay float32, and the contract differs only in
``precision: "int8"`` and its provenance.

The variant is written beside the source, in the same model repository (atomically, by
core.repository.publish), only if ONNX Runtime loads it, the contract agrees with its
graph, and its score on ``--eval`` (the task's metric:
top-1, mAP@.5 or mIoU, through core.evaluation) is within ``--max-drop`` of the source's
(default 0.01: one point). The report, with both scores and both models' speed on this
machine, is printed and stored in the provenance. int8 pays where convolutions dominate
(ResNets); on MobileNetV3 ONNX Runtime's int8 kernels are slower than fp32 (depthwise
convolutions, hard-swish and squeeze-excitation stay float between quantise/dequantise
pairs): the report says so, and nothing stops you keeping the fp32 model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from core.contract import ModelContract
from core.errors import ContractError, DatasetError, InvalidImage
from core.imaging import IMAGE_SUFFIXES, load_input
from core.onnx_contract import read_contract
from core.repository import model_path, parse_model_path, publish
from core.runtime import OnnxModel
from core.tasks import TASKS
from export.evaluate import evaluate

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


class QuantizationError(ValueError):
    """The int8 variant failed a check; nothing was written."""


def calibration_images(root: Path, contract: ModelContract, count: int) -> list[np.ndarray]:
    """Up to ``count`` images under ``root`` (any layout), as the service feeds them: [1, H, W, 3] uint8."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{root}: no images to calibrate on")
    batches = []
    for path in files[: max(count, 1)]:
        try:
            _, arr, _ = load_input(path, contract.input)
        except InvalidImage:
            continue
        batches.append(arr[None])
    if not batches:
        raise DatasetError(f"{root}: none of the images could be read")
    return batches


class _Reader(CalibrationDataReader):
    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        arr = next(self._it, None)
        return None if arr is None else {self.input_name: arr}


def images_per_second(path: Path, contract: ModelContract, batch: int = 8, seconds: float = 2.0) -> float:
    """One-thread ONNX Runtime throughput on a batch of ``batch`` (the service's default CPU batch)."""
    model = OnnxModel.load(path, "speed", "0", "cpu", 1)
    i = contract.input
    size = min(batch, contract.batch.max_size or batch)
    x = np.random.default_rng(0).integers(0, 256, (size, i.height, i.width, i.channels), dtype=np.uint8)
    model.infer(x)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.infer(x)
        done += size
    return done / (time.perf_counter() - t0)


def main_path_nodes(source: Path, contract: ModelContract) -> list[str]:
    """The convolutions and matrix products that compute the task's outputs. The class
    activation maps' branch stays float: it multiplies the head's weights in the other
    orientation, which per-channel weight quantisation cannot share (and it is what the
    maps' precision rests on)."""
    model = onnx.load(str(source), load_external_data=False)
    wanted = {n for n in contract.outputs.tensor_names() if n != contract.outputs.cam}
    producer = {out: node for node in model.graph.node for out in node.output}
    keep: set[str] = set()
    stack = list(wanted)
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in keep:
            continue
        keep.add(node.name)
        stack.extend(node.input)
    return [n.name for n in model.graph.node if n.name in keep and n.op_type in QUANTIZED_OPS]


def loads_in_onnxruntime(path: Path) -> None:
    """Open ``path`` in an ONNX Runtime CPU session (where an int8 variant serves); raises if it cannot."""
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def quantize(source: Path, out: Path, calibration: Path, eval_data: Path, images: int = 100,
             max_drop: float = 0.01, full_range: bool = False) -> dict[str, Any]:
    """Write the int8 variant of ``source`` to ``out`` (a repository path,
    ``<root>/<name>/<version>/model.onnx``) if it passes; returns the report.
    Raises QuantizationError, ContractError or DatasetError, with nothing written."""
    contract = read_contract(source)
    if contract.precision != "fp32":
        raise QuantizationError(f"{source} is already {contract.precision}")
    metric = TASKS[contract.task].metric
    batches = calibration_images(calibration, contract, images)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        quantize_static(str(source), str(raw), _Reader(contract.input.name, batches),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=not full_range, op_types_to_quantize=QUANTIZED_OPS,
                        nodes_to_quantize=main_path_nodes(source, contract),
                        calibrate_method=CalibrationMethod.MinMax)
        base = evaluate(source, eval_data)
        variant_score = evaluate(raw, eval_data)
        report = {
            "method": "onnxruntime quantize_static, QDQ, U8S8 per-channel, MinMax",
            "reduce_range": not full_range, "calibration_images": len(batches), "calibration": str(calibration),
            "eval": str(eval_data), "metric": metric, "fp32": base[metric], "int8": variant_score[metric],
            "fp32_img_s": round(images_per_second(source, contract), 1),
            "int8_img_s": round(images_per_second(raw, contract), 1),
        }
        report["speedup"] = round(report["int8_img_s"] / report["fp32_img_s"], 2)
        drop = base[metric] - variant_score[metric]
        if drop > max_drop:
            raise QuantizationError(f"{metric} fell from {base[metric]:.4f} to {variant_score[metric]:.4f} "
                                    f"(more than {max_drop}) on {eval_data}")
        model = onnx.load(str(raw))
    variant = ModelContract.from_dict({**json.loads(contract.to_json()), "precision": "int8"})
    variant = variant.with_provenance(quantization=report, quantized_from=str(source))
    root, name, version = parse_model_path(out)
    publish(model, variant, root, name, version, check=loads_in_onnxruntime)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write an int8 variant of an exported model (CPU).")
    p.add_argument("model", type=Path, help="the fp32 model.onnx (<repo>/<name>/<version>/model.onnx)")
    p.add_argument("--calibration", type=Path, required=True, help="images to calibrate on (e.g. the training set)")
    p.add_argument("--eval", type=Path, required=True, help="dataset in the task's layout to compare scores on")
    p.add_argument("--version", required=True, help="version folder for the variant, beside the source's")
    p.add_argument("--name", help="model name (default: the source's)")
    p.add_argument("--images", type=int, default=100, help="calibration images (default 100)")
    p.add_argument("--max-drop", type=float, default=0.01, help="largest score drop accepted (default 0.01)")
    p.add_argument("--full-range", action="store_true", help="8-bit weights (only for CPUs with VNNI)")
    a = p.parse_args(argv)
    source = a.model.resolve()
    root, name, _ = parse_model_path(source)
    out = model_path(root, a.name or name, a.version)
    if out == source:
        raise SystemExit("quantize: --version must differ from the source's version")
    try:
        report = quantize(source, out, a.calibration, a.eval, a.images, a.max_drop, a.full_range)
    except (QuantizationError, ContractError, DatasetError) as exc:
        print(f"quantize failed, nothing written: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({"model": str(out), "bytes": out.stat().st_size, **report}))


if __name__ == "__main__":
    main()
