"""The model contract: the JSON document an ONNX file carries about itself.

This module is the one place that reads, writes and validates it. An exported model stores
the document in ``metadata_props`` under the key ``convserve``; the service trusts nothing
model-specific that is not in it. See README.md "Model contract" for the full schema.

Pure Python + NumPy; no torch, no onnx import (the service reads metadata through ONNX
Runtime, the exporter through onnx, and both hand the graph's I/O to :func:`check_io`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

METADATA_KEY = "convserve"
SCHEMA_VERSION = 1
TASKS = ("classification", "detection", "segmentation")
RESIZE_POLICIES = ("stretch", "letterbox")


class ContractError(ValueError):
    """The model's contract document is missing, malformed or disagrees with its graph."""


@dataclass(frozen=True)
class InputSpec:
    """The image tensor the graph takes: always uint8 NHWC RGB of a fixed height/width."""

    name: str
    height: int
    width: int
    layout: str = "NHWC"
    dtype: str = "uint8"
    channels: int = 3
    color: str = "RGB"
    resize: str = "stretch"          # stretch | letterbox (keep aspect, pad bottom/right)
    pad_value: int = 114             # letterbox fill, per channel
    normalized_in_graph: bool = True  # uint8 -> float and mean/std happen inside the graph


@dataclass(frozen=True)
class OutputSpec:
    """What the graph's outputs mean, by task.

    classification: ``scores`` names a [N, C] tensor; ``kind`` is logits | probabilities.
    detection: ``boxes`` [N, K, 4] xyxy in model-input pixels, ``scores`` [N, K],
      ``labels`` [N, K] (index into labels), padded to K = max_detections; padding rows have
      score 0. ``count`` optionally names an [N] valid-count output. For batch-1 graphs
      (torchvision detectors) the leading N axis may be absent.
    segmentation: ``masks`` names [N, C, H, W] logits (kind mask_logits) or an [N, H, W]
      class-index map (kind class_map) at model-input resolution.
    """

    kind: str
    scores: str | None = None
    boxes: str | None = None
    labels: str | None = None
    count: str | None = None
    masks: str | None = None
    boxes_format: str = "xyxy"
    box_space: str = "input_pixels"
    max_detections: int | None = None
    nms_in_graph: bool | None = None

    def tensor_names(self) -> list[str]:
        return [n for n in (self.boxes, self.scores, self.labels, self.count, self.masks) if n]


@dataclass(frozen=True)
class BatchSpec:
    dynamic: bool = True
    size: int | None = None  # fixed batch size when not dynamic

    @property
    def max_size(self) -> int | None:
        return None if self.dynamic else self.size


@dataclass(frozen=True)
class ModelContract:
    task: str
    labels: list[str]
    input: InputSpec
    outputs: OutputSpec
    batch: BatchSpec = field(default_factory=BatchSpec)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "ModelContract":
        """Parse and validate a contract document; raises ContractError naming the problem."""
        if not text:
            raise ContractError(f"no '{METADATA_KEY}' entry in the ONNX metadata_props")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"contract is not valid JSON: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "ModelContract":
        if not isinstance(doc, dict):
            raise ContractError("contract must be a JSON object")
        missing = [k for k in ("task", "labels", "input", "outputs") if k not in doc]
        if missing:
            raise ContractError(f"contract lacks required keys: {missing}")
        try:
            inp = InputSpec(**doc["input"])
            out = OutputSpec(**doc["outputs"])
            batch = BatchSpec(**doc.get("batch", {}))
        except TypeError as exc:
            raise ContractError(f"contract has an unknown or missing field: {exc}") from None
        contract = cls(
            task=doc["task"], labels=list(doc["labels"]), input=inp, outputs=out, batch=batch,
            provenance=dict(doc.get("provenance", {})),
            schema_version=int(doc.get("schema_version", SCHEMA_VERSION)),
        )
        contract.validate()
        return contract

    def validate(self) -> None:
        """Check internal consistency (not against a graph: see check_io)."""
        if self.schema_version != SCHEMA_VERSION:
            raise ContractError(f"unsupported schema_version {self.schema_version}")
        if self.task not in TASKS:
            raise ContractError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.labels or not all(isinstance(s, str) and s for s in self.labels):
            raise ContractError("labels must be a non-empty list of non-empty strings")
        i = self.input
        if i.layout != "NHWC" or i.dtype != "uint8" or i.channels != 3 or i.color != "RGB":
            raise ContractError("input must be uint8 NHWC RGB (layout, dtype, channels, color)")
        if not (isinstance(i.height, int) and isinstance(i.width, int) and i.height > 0 and i.width > 0):
            raise ContractError("input height/width must be positive integers")
        if i.resize not in RESIZE_POLICIES:
            raise ContractError(f"input.resize must be one of {RESIZE_POLICIES}")
        if not 0 <= i.pad_value <= 255:
            raise ContractError("input.pad_value must be in 0..255")
        o = self.outputs
        need = {
            "classification": (("scores",), ("logits", "probabilities")),
            "detection": (("boxes", "scores", "labels"), ("boxes",)),
            "segmentation": (("masks",), ("mask_logits", "class_map")),
        }[self.task]
        absent = [k for k in need[0] if not getattr(o, k)]
        if absent:
            raise ContractError(f"{self.task} outputs must name {absent}")
        if o.kind not in need[1]:
            raise ContractError(f"{self.task} outputs.kind must be one of {need[1]}, got {o.kind!r}")
        if self.task == "detection" and (o.boxes_format != "xyxy" or o.box_space != "input_pixels"):
            raise ContractError("detection boxes must be xyxy in input_pixels")
        if not self.batch.dynamic and not (self.batch.size and self.batch.size > 0):
            raise ContractError("a fixed batch needs batch.size > 0")


def check_io(
    contract: ModelContract,
    inputs: Iterable[tuple[str, str, list[Any]]],
    outputs: Iterable[tuple[str, str, list[Any]]],
) -> None:
    """Check the contract against the graph's (name, element type, shape) inputs/outputs.

    Element types are ONNX Runtime style strings ("tensor(uint8)"); shape entries are ints
    for fixed dimensions and strings/None for symbolic ones.
    """
    inputs, outputs = list(inputs), list(outputs)
    by_name = {n: (t, s) for n, t, s in inputs}
    spec = contract.input
    if spec.name not in by_name:
        raise ContractError(f"graph has no input named {spec.name!r} (has {sorted(by_name)})")
    if len(inputs) != 1:
        raise ContractError(f"graph must take exactly one input, takes {[n for n, _, _ in inputs]}")
    etype, shape = by_name[spec.name]
    if etype != "tensor(uint8)":
        raise ContractError(f"input {spec.name!r} must be uint8, is {etype}")
    if len(shape) != 4 or list(shape[1:]) != [spec.height, spec.width, 3]:
        raise ContractError(
            f"input {spec.name!r} shape {shape} does not match [N, {spec.height}, {spec.width}, 3]")
    n = shape[0]
    if contract.batch.dynamic and isinstance(n, int):
        raise ContractError(f"contract says dynamic batch but the graph's batch axis is fixed at {n}")
    if not contract.batch.dynamic and isinstance(n, int) and n != contract.batch.size:
        raise ContractError(f"contract says batch {contract.batch.size}, graph has {n}")
    out_names = {n for n, _, _ in outputs}
    missing = [t for t in contract.outputs.tensor_names() if t not in out_names]
    if missing:
        raise ContractError(f"graph lacks outputs named {missing} (has {sorted(out_names)})")
