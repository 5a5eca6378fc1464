"""Score an exported ONNX model on a dataset directory through ONNX Runtime (not PyTorch).

Usage::

    python -m export.evaluate models/shapes-classifier/1/model.onnx --data data/cls/val

core.evaluation loads, resizes and post-processes every image with the service's own code,
and the same function validated the checkpoint during training, so the figures are what the
service would score and what the model's provenance records. Prints the task's metrics as
JSON: top-1 (and top-5 with more than five classes) for classification; per-class IoU and
mIoU at original image size for segmentation; COCO mAP@[.5:.95], mAP@.5 and mAP@.75
(pycocotools) for detection. Files that are not images are skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from core.errors import ContractError, DatasetError
from core.evaluation import evaluate as evaluate_predictions
from core.repository import parse_model_path
from core.runtime import OnnxModel


def evaluate(onnx_path: Path, data: Path, batch_size: int = 16, threads: int = 2) -> dict[str, Any]:
    """Metrics of ``onnx_path`` on ``data`` (ImageFolder / COCO / mask-PNG layout by task)."""
    _, name, version = parse_model_path(onnx_path)
    model = OnnxModel.load(onnx_path, name, version, "auto", threads)
    return evaluate_predictions(model.infer, model.contract, data, batch_size)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    p = argparse.ArgumentParser(description="Evaluate an ONNX model through ONNX Runtime.")
    p.add_argument("model", type=Path, help="path to model.onnx")
    p.add_argument("--data", type=Path, required=True, help="dataset directory in the task's format")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    a = p.parse_args(argv)
    try:
        metrics = evaluate(a.model, a.data, a.batch_size, a.threads)
    except (ContractError, DatasetError) as exc:
        print(f"cannot evaluate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"model": str(a.model), "data": str(a.data), **metrics}))


if __name__ == "__main__":
    main()
