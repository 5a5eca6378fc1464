"""Checkpoint -> self-describing ONNX in the model repository, with a parity check.

Usage::

    python -m export.onnx_export runs/shapes-classifier/best.pt --name shapes-classifier \\
        --version 1 --parity-data data/cls/val [--models-dir models] [--fixed-batch N] [--embedding] [--cam]

The checkpoint is read by training.models.load_checkpoint (training.checkpoints owns its format).
The graph takes uint8 NHWC RGB, or one
greyscale channel for a model trained on greyscale data (normalisation inside), with a
dynamic batch axis, or a fixed one with ``--fixed-batch``; a classifier can add the extra
outputs ``--embedding`` (its penultimate features, for /embed) and ``--cam`` (class
activation maps, for /classify?cam=true); it carries the model contract (core/contract.py)
in metadata_props under "convserve" (written by core.onnx_contract.set_contract), passes
onnx.checker, and must agree with PyTorch on real images from ``--parity-data``
(export/parity.py states the tolerances). Otherwise nothing is written and the command
fails. The file goes to ``<models-dir>/<name>/<version>/model.onnx`` by
core.repository.publish, in one rename.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from core.contract import ModelContract
from core.errors import ContractError, DatasetError
from core.onnx_contract import set_contract
from core.repository import publish
from export.parity import ParityError, check_parity
from training.graph import INPUT_NAME, graph_contract
from training.models import ConvNet, load_checkpoint

OPSET = 17


def provenance(cfg: dict[str, Any], metrics: dict[str, Any], dataset: str, checkpoint_sha256: str) -> dict[str, Any]:
    """Where the model came from: architecture, data, training settings and validation metrics."""
    return {
        "architecture": cfg["arch"], "width_mult": cfg.get("width_mult", 1.0), "dataset": dataset,
        "training": {k: cfg[k] for k in ("epochs", "batch_size", "lr", "seed", "train", "val", "weights", "freeze")
                     if cfg.get(k) is not None},
        "metrics": metrics, "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint_sha256": checkpoint_sha256, "torch": torch.__version__, "opset": OPSET,
    }


def to_onnx(module: nn.Module, model: ConvNet, contract: ModelContract, path: Path) -> None:
    """TorchScript-based export (dynamo=False: the dynamo exporter fails inside torchvision's NMS)."""
    names = contract.outputs.tensor_names()
    i = contract.input
    dummy = torch.full((contract.batch.size or 2, i.height, i.width, i.channels), 114, dtype=torch.uint8)
    if contract.batch.dynamic:
        axes: dict[str, dict[int, str]] | None = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    elif not model.batchable:  # one image per call, outputs without a batch axis: the detection count varies
        axes = {n: {0: "detections"} for n in names}
    else:
        axes = None
    torch.onnx.export(module, (dummy,), str(path), input_names=[INPUT_NAME], output_names=names,
                      dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def cam_macs(model: ConvNet, contract: ModelContract) -> int:
    """The class activation maps' multiply-adds per image (training.classifiers.cam_cost);
    warns on stderr when they are many (an MLP head over many classes)."""
    from training.classifiers import cam_cost

    i = contract.input
    with torch.no_grad():
        shape = tuple(model.features(torch.zeros(1, i.height, i.width, i.channels, dtype=torch.uint8)).shape[1:])
    macs = cam_cost(model.head, shape, len(contract.labels))
    if macs > 5e8:
        print(f"warning: --cam costs about {macs / 1e9:.1f} G multiply-adds per image for {len(contract.labels)} "
              "classes with this head; every /classify request pays it", file=sys.stderr)
    return int(macs)


def attach_contract(path: Path, contract: ModelContract) -> onnx.ModelProto:
    """The graph :func:`to_onnx` wrote at ``path``, produced by "convserve", with ``contract``
    written into its metadata and checked (core.onnx_contract.set_contract)."""
    model = onnx.load(str(path))
    model.producer_name = "convserve"
    return set_contract(model, contract)


def export(checkpoint: Path, name: str, version: str, models_dir: Path, dataset: str,
           parity_data: Path | None, parity_images: int = 16, fixed_batch: int | None = None,
           extras: list[str] | tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Export ``checkpoint`` into the model repository at ``models_dir`` as ``name`` version
    ``version``; returns (path, parity report).

    ``extras``: extra outputs (embedding, cam) for a classifier. Raises ParityError (PyTorch
    and ONNX Runtime disagree) or ContractError before anything is written; the file
    appears at its final path in one rename (core.repository.publish).
    """
    model, cfg, metrics = load_checkpoint(checkpoint, extras)
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    contract = graph_contract(model, cfg["task"], cfg["classes"], cfg["size"], fixed_batch, cfg.get("channels") or 3)
    contract = contract.with_provenance(**provenance(cfg, metrics, dataset, sha))
    if "cam" in extras:
        contract = contract.with_provenance(cam_macs_per_image=cam_macs(model, contract))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        to_onnx(model.export_module().eval(), model, contract, raw)
        graph = attach_contract(raw, contract)
        onnx.save(graph, str(raw))
        report = check_parity(model, raw, contract, parity_data, parity_images) if parity_data else {"skipped": True}
    out = publish(graph, contract.with_provenance(parity=report), models_dir, name, version)
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
    p.add_argument("--fixed-batch", type=int, help="export a graph that always takes this many images")
    p.add_argument("--embedding", action="store_true", help="classifiers: add the penultimate features as the "
                   "output 'embedding' (served by /embed)")
    p.add_argument("--cam", action="store_true", help="classifiers: add class activation maps (Grad-CAM, in the "
                   "graph) as the output 'cam' (served by /classify with cam=true)")
    a = p.parse_args(argv)
    extras = [name for name, on in (("embedding", a.embedding), ("cam", a.cam)) if on]
    try:
        out, report = export(a.checkpoint, a.name, a.version, a.models_dir, a.dataset, a.parity_data,
                             a.parity_images, a.fixed_batch, extras)
    except ParityError as exc:
        print(f"parity check failed, nothing written: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ContractError, DatasetError, ValueError) as exc:
        print(f"export failed, nothing written: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"model": str(out), "bytes": out.stat().st_size, "parity": report}))


if __name__ == "__main__":
    main()
