"""Checkpoint -> self-describing ONNX in the model repository, with a parity check.

Usage::

    python -m export.onnx_export runs/shapes-classifier/best.pt --name shapes-classifier \\
        --version 1 --parity-data data/cls/val [--models-dir models]

The graph takes uint8 NHWC RGB with a dynamic batch axis (normalisation inside), carries
the model contract (service/contract.py) in metadata_props under "convserve", passes
onnx.checker, and must agree with PyTorch on real images from ``--parity-data`` (see
export/parity.py for the tolerances); otherwise nothing is written and the command fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.parity import ParityError, check_parity
from service.contract import METADATA_KEY, BatchSpec, InputSpec, ModelContract, OutputSpec
from service.onnx_meta import contract_of
from training.models import build_model
from training.tv_detection import BUILDERS as TORCHVISION_DETECTORS

INPUT_NAME = "images"
OPSET = 17
MAX_DETECTIONS = 100


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, training config, validation metrics) from a training checkpoint."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ck["config"]
    model = build_model(cfg["task"], cfg["arch"], len(cfg["classes"]), cfg.get("width_mult", 1.0))
    model.load_state_dict(ck["model"])
    return model.eval(), cfg, ck.get("metrics", {})


def export_module(model: nn.Module, task: str) -> tuple[nn.Module, list[str]]:
    """The module that becomes the graph, and its output names."""
    if task == "detection":
        from training.centernet import CenterNetExport
        from training.tv_detection import TorchvisionDetectorExport

        wrapper = TorchvisionDetectorExport if getattr(model, "takes_uint8", False) else CenterNetExport
        return wrapper(model).eval(), ["boxes", "scores", "labels"]
    if task == "segmentation":
        return model, ["masks"]
    return model, ["logits"]


def build_contract(cfg: dict[str, Any], metrics: dict[str, Any], dataset: str, checkpoint_sha256: str) -> ModelContract:
    task, size = cfg["task"], cfg["size"]
    if task == "classification":
        outputs = OutputSpec(kind="logits", scores="logits")
        inp = InputSpec(name=INPUT_NAME, height=size, width=size, resize="stretch")
    elif task == "segmentation":
        outputs = OutputSpec(kind="mask_logits", masks="masks")
        inp = InputSpec(name=INPUT_NAME, height=size, width=size, resize="stretch")
    else:
        inp = InputSpec(name=INPUT_NAME, height=size, width=size, resize="letterbox", pad_value=114)
        outputs = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels",
                             max_detections=MAX_DETECTIONS, nms_in_graph=True)
    labels = list(cfg["classes"])
    batch = BatchSpec(dynamic=True)
    if cfg["arch"] in TORCHVISION_DETECTORS:  # one image per call; label 0 is background
        labels, batch = ["__background__", *labels], BatchSpec(dynamic=False, size=1)
        outputs = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels", nms_in_graph=True)
    provenance = {
        "architecture": cfg["arch"], "width_mult": cfg.get("width_mult", 1.0), "dataset": dataset,
        "training": {k: cfg[k] for k in ("epochs", "batch_size", "lr", "seed", "train", "val") if k in cfg},
        "metrics": {k: v for k, v in metrics.items() if k != "iou"} | ({"iou": metrics["iou"]} if "iou" in metrics else {}),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_sha256": checkpoint_sha256, "torch": torch.__version__, "opset": OPSET,
    }
    return ModelContract(task=task, labels=labels, input=inp, outputs=outputs, batch=batch, provenance=provenance)


def to_onnx(module: nn.Module, size: int, output_names: list[str], path: Path, dynamic_batch: bool = True) -> None:
    """TorchScript-based export (dynamo=False): the dynamo exporter fails inside torchvision's NMS."""
    if dynamic_batch:
        dummy = torch.full((2, size, size, 3), 114, dtype=torch.uint8)
        axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    else:  # one image per call; the detection count is the dynamic axis
        dummy = torch.full((1, size, size, 3), 114, dtype=torch.uint8)
        axes = {n: {0: "detections"} for n in output_names}
    torch.onnx.export(module, (dummy,), str(path), input_names=[INPUT_NAME], output_names=output_names,
                      dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def attach_contract(path: Path, contract: ModelContract) -> onnx.ModelProto:
    """Write the contract into metadata_props, check graph and contract agree, run the checker."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, contract.to_json()
    model.producer_name = "convserve"

    contract_of(model)  # the document parses and agrees with the graph
    onnx.checker.check_model(model, full_check=True)
    return model


def export(checkpoint: Path, name: str, version: str, models_dir: Path, dataset: str,
           parity_data: Path | None, parity_images: int = 16) -> tuple[Path, dict[str, Any]]:
    """Export ``checkpoint`` to ``models_dir/name/version/model.onnx``; returns (path, parity report)."""
    model, cfg, metrics = load_checkpoint(checkpoint)
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    contract = build_contract(cfg, metrics, dataset, sha)
    module, output_names = export_module(model, cfg["task"])
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        to_onnx(module, cfg["size"], output_names, raw, dynamic_batch=contract.batch.dynamic)
        proto = attach_contract(raw, contract)
        onnx.save(proto, str(raw))
        report = check_parity(module, raw, contract, parity_data, parity_images) if parity_data else {"skipped": True}
        final_contract = ModelContract(**{**contract.__dict__, "provenance": {**contract.provenance, "parity": report}})
        proto = attach_contract(raw, final_contract)
        out = models_dir / name / version / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(out))
    return out, report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export a training checkpoint to the model repository.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--version", default="1", help="version folder (default 1)")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--dataset", default="", help="free text for the contract's provenance")
    p.add_argument("--parity-data", type=Path, help="dataset directory with real images for the parity check")
    p.add_argument("--parity-images", type=int, default=16)
    a = p.parse_args(argv)
    try:
        out, report = export(a.checkpoint, a.name, a.version, a.models_dir, a.dataset, a.parity_data, a.parity_images)
    except ParityError as exc:
        print(f"parity check failed, nothing written: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({"model": str(out), "bytes": out.stat().st_size, "parity": report}))


if __name__ == "__main__":
    main()
