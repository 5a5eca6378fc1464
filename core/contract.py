"""The model contract: the JSON document an ONNX file carries about itself.

This module is the one place that parses and validates it. An exported model stores the
document in ``metadata_props`` under the key ``convserve``; the service trusts nothing
model-specific that is not in it. See README.md "The model contract" for the schema.

Every field is type-checked against the dataclasses below and every error is a
ContractError that names the field (``input.pad_value: expected an integer, got 'x'``).
What each task's outputs must name and how they are shaped is declared here too
(:data:`LAYOUTS`): it is part of the document, and core.tasks (what a task does with those
outputs) reads it from here. Pure Python; the graph's I/O is handed to :func:`check_io` by
whoever opened the file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import ContractError

METADATA_KEY = "convserve"
SCHEMA_VERSION = 1
RESIZE_POLICIES = ("stretch", "letterbox")
MAX_SIDE = 16384  # larger model inputs are almost certainly a mistake
PRECISIONS = ("fp32", "int8")  # model variants; export.quantize writes int8


@dataclass(frozen=True)
class InputSpec:
    """The image tensor the graph takes: uint8 NHWC of a fixed height and width, RGB
    (``channels`` 3) or greyscale (``channels`` 1, ``color`` "L"; uploads are converted)."""

    name: str
    height: int
    width: int
    layout: str = "NHWC"
    dtype: str = "uint8"
    channels: int = 3
    color: str = "RGB"               # RGB for 3 channels, L (greyscale) for 1
    resize: str = "stretch"          # stretch | letterbox (keep aspect, pad bottom/right)
    pad_value: int = 114             # letterbox fill, per channel
    normalized_in_graph: bool = True  # uint8 -> float and mean/std happen inside the graph


@dataclass(frozen=True)
class OutputSpec:
    """What the graph's outputs mean; which fields a task needs is in :data:`LAYOUTS`.

    classification: ``scores`` names [N, C] logits or probabilities (``kind``); optionally
      ``embedding`` [N, D] (the penultimate features, for similarity search) and ``cam``
      [N, C, h, w] (a class activation map per class, >= 0, on the last feature grid).
    detection: ``boxes`` [N, K, 4] xyxy in model-input pixels, ``scores`` [N, K], ``labels``
      [N, K] (indices into labels), padded to K with score-0 rows.
    segmentation: ``masks`` names [N, C, H, W] mask_logits or an [N, H, W] class_map.
    instance_segmentation: detection's three plus ``masks`` [N, K, h, w]: each detection's mask
      probability (0..1) over the whole model input at h x w (any resolution: the service scales
      the grid onto the input's pixels), zero outside the object's box.
    keypoints: detection's three plus ``keypoints`` [N, K, P, 3]: each detection's P keypoints
      (x, y in model-input pixels, confidence in [0, 1]), in the order of the contract's
      ``keypoints.names``.
    embedding (kind ``l2_normalized``): ``embedding`` [N, D], unit-length vectors trained for
      distance (similarity learning), D the contract's ``embedding.dimension``.
    A graph with a fixed batch of 1 may leave the leading N axis out of its outputs.
    """

    kind: str
    scores: str | None = None
    boxes: str | None = None
    labels: str | None = None
    count: str | None = None
    masks: str | None = None
    embedding: str | None = None
    cam: str | None = None
    keypoints: str | None = None
    boxes_format: str = "xyxy"
    box_space: str = "input_pixels"
    max_detections: int | None = None
    nms_in_graph: bool | None = None

    def tensor_names(self) -> list[str]:
        """The graph outputs this spec names, in a fixed order."""
        return [n for n in (self.boxes, self.scores, self.labels, self.keypoints, self.count, self.masks,
                            self.embedding, self.cam) if n]


@dataclass(frozen=True)
class KeypointSpec:
    """A keypoint model's skeleton: the P keypoint ``names`` in output order, the ``skeleton``'s
    edges as pairs of 0-based indices into them (what a drawing joins), and one OKS ``sigma``
    per keypoint (COCO's per-keypoint falloff: how far, relative to the object's size, a
    prediction may land and still count; pycocotools' ``kpt_oks_sigmas``)."""

    names: list[str]
    skeleton: list[list[int]]
    sigmas: list[float]

    def validate(self) -> None:
        if not self.names:
            raise ContractError("keypoints.names: must list at least one keypoint")
        if len(set(self.names)) != len(self.names) or not all(self.names):
            raise ContractError("keypoints.names: empty or duplicate keypoint name")
        for i, edge in enumerate(self.skeleton):
            if len(edge) != 2 or not all(0 <= j < len(self.names) for j in edge):
                raise ContractError(f"keypoints.skeleton[{i}]: must be two indices in 0..{len(self.names) - 1}, "
                                    f"got {edge}")
        if len(self.sigmas) != len(self.names) or not all(v > 0 for v in self.sigmas):
            raise ContractError(f"keypoints.sigmas: must hold one positive number per keypoint ({len(self.names)})")


EMBEDDING_METRICS = ("cosine",)  # how an embedding model's vectors are compared
MAX_EMBEDDING_DIMENSION = 4096


@dataclass(frozen=True)
class EmbeddingSpec:
    """An embedding model's vectors: their ``dimension`` and the ``metric`` they were trained
    for (``cosine``: the graph outputs unit-length vectors, so the cosine similarity of two
    images is the dot product of their embeddings). Galleries (service.galleries) keep what
    one model version wrote and compare by this metric."""

    dimension: int
    metric: str = "cosine"

    def validate(self) -> None:
        if not 1 <= self.dimension <= MAX_EMBEDDING_DIMENSION:
            raise ContractError(f"embedding.dimension: must be in 1..{MAX_EMBEDDING_DIMENSION}, got {self.dimension}")
        if self.metric not in EMBEDDING_METRICS:
            raise ContractError(f"embedding.metric: must be one of {list(EMBEDDING_METRICS)}, got {self.metric!r}")


@dataclass(frozen=True)
class BatchSpec:
    """A dynamic batch axis, or a fixed batch ``size`` the graph always takes."""

    dynamic: bool = True
    size: int | None = None

    @property
    def max_size(self) -> int | None:
        return None if self.dynamic else self.size


# OutputSpec's tensor fields
OUTPUT_FIELDS = ("scores", "boxes", "labels", "keypoints", "count", "masks", "embedding", "cam")


@dataclass(frozen=True)
class OutputLayout:
    """What a task's graph outputs are: the allowed ``outputs.kind`` values, the rank of one
    image's tensor for each output field (by kind; ``"*"`` for any kind), the fields that may
    be left out."""

    kinds: tuple[str, ...]
    image_ranks: Mapping[str, Mapping[str, int]]
    optional: tuple[str, ...] = ()
    labelled: bool = True  # the contract lists class names (an embedding model has none)

    def check(self, task: str, spec: OutputSpec) -> None:
        """ContractError naming the field if ``spec`` is not a valid output spec for ``task``."""
        if spec.kind not in self.kinds:
            raise ContractError(f"outputs.kind: a {task} model's must be one of {self.kinds}, got {spec.kind!r}")
        for name in self.image_ranks:
            if name not in self.optional and not getattr(spec, name):
                raise ContractError(f"outputs.{name}: required for {task} (the graph output it names)")
        for name in OUTPUT_FIELDS:
            if name not in self.image_ranks and getattr(spec, name):
                raise ContractError(f"outputs.{name}: not an output of a {task} model")
        if spec.max_detections is not None and spec.max_detections < 1:
            raise ContractError(f"outputs.max_detections: must be >= 1, got {spec.max_detections}")

    def named(self, spec: OutputSpec) -> dict[str, str]:
        """Contract field -> graph output name, for the fields ``spec`` sets."""
        return {f: getattr(spec, f) for f in self.image_ranks if getattr(spec, f)}

    def image_rank(self, output_field: str, kind: str) -> int:
        """The rank of one image's ``output_field`` tensor for outputs of ``kind``."""
        ranks = self.image_ranks[output_field]
        return ranks.get(kind, ranks.get("*", -1))


_CLASSIFIER_RANKS = {"scores": {"*": 1}, "embedding": {"*": 1}, "cam": {"*": 3}}
# Every task's output layout, by task name (the tasks themselves: core.tasks.TASKS).
LAYOUTS: dict[str, OutputLayout] = {
    "classification": OutputLayout(kinds=("logits", "probabilities"), image_ranks=_CLASSIFIER_RANKS,
                                   optional=("embedding", "cam")),
    "detection": OutputLayout(kinds=("boxes",), optional=("count",),
                              image_ranks={"boxes": {"*": 2}, "scores": {"*": 1}, "labels": {"*": 1},
                                           "count": {"*": 0}}),
    "segmentation": OutputLayout(kinds=("mask_logits", "class_map"),
                                 image_ranks={"masks": {"mask_logits": 3, "class_map": 2}}),
    "instance_segmentation": OutputLayout(kinds=("boxes",), optional=("count",),
                                          image_ranks={"boxes": {"*": 2}, "scores": {"*": 1}, "labels": {"*": 1},
                                                       "masks": {"*": 3}, "count": {"*": 0}}),
    "keypoints": OutputLayout(kinds=("boxes",), optional=("count",),
                              image_ranks={"boxes": {"*": 2}, "scores": {"*": 1}, "labels": {"*": 1},
                                           "keypoints": {"*": 3}, "count": {"*": 0}}),
    "embedding": OutputLayout(kinds=("l2_normalized",), image_ranks={"embedding": {"*": 1}}, labelled=False),
}
NEEDS_KEYPOINTS = ("keypoints",)  # the tasks whose contract carries a KeypointSpec
NEEDS_EMBEDDING = ("embedding",)  # the tasks whose contract carries an EmbeddingSpec
# The contract's task-specific fields: the tasks that need each, and what it holds (for messages).
TASK_SPECS = {"keypoints": (NEEDS_KEYPOINTS, "names, skeleton, sigmas"),
              "embedding": (NEEDS_EMBEDDING, "dimension, metric")}


@dataclass(frozen=True)
class ModelContract:
    task: str
    labels: list[str]
    input: InputSpec
    outputs: OutputSpec
    batch: BatchSpec = field(default_factory=BatchSpec)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    precision: str = "fp32"  # the variant: fp32, or int8 (export.quantize); inputs stay uint8 either way
    keypoints: KeypointSpec | None = None  # keypoint models only: names, skeleton, OKS sigmas
    embedding: EmbeddingSpec | None = None  # embedding models only: dimension, metric

    def to_json(self) -> str:
        doc = asdict(self)
        for optional in TASK_SPECS:  # the other tasks' documents stay as they were
            if doc[optional] is None:
                del doc[optional]
        return json.dumps(doc, sort_keys=True)

    def with_provenance(self, **entries: Any) -> ModelContract:
        """A copy with ``entries`` added to the provenance."""
        return dataclasses.replace(self, provenance={**self.provenance, **entries})

    @classmethod
    def from_json(cls, text: str | None) -> ModelContract:
        """Parse and validate a contract document; raises ContractError naming the field."""
        if not text:
            raise ContractError(f"no '{METADATA_KEY}' entry in the ONNX metadata_props")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"contract is not valid JSON: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> ModelContract:
        """Build from a parsed document, checking every field's type, then validate."""
        contract = _build(cls, doc, "")
        contract.validate()
        return contract

    def validate(self) -> None:
        """Check values and consistency (not against a graph: see check_io)."""
        if self.schema_version != SCHEMA_VERSION:
            raise ContractError(f"schema_version: unsupported version {self.schema_version} (this is {SCHEMA_VERSION})")
        if self.task not in LAYOUTS:
            raise ContractError(f"task: must be one of {sorted(LAYOUTS)}, got {self.task!r}")
        if self.precision not in PRECISIONS:
            raise ContractError(f"precision: must be one of {list(PRECISIONS)}, got {self.precision!r}")
        layout = LAYOUTS[self.task]
        if layout.labelled and not self.labels:
            raise ContractError("labels: must list at least one class name")
        if not layout.labelled and self.labels:
            raise ContractError(f"labels: a {self.task} model has no classes; must be empty")
        seen: set[str] = set()
        for i, name in enumerate(self.labels):
            if not name:
                raise ContractError(f"labels[{i}]: empty class name")
            if name in seen:
                raise ContractError(f"labels[{i}]: duplicate class name {name!r}")
            seen.add(name)
        _validate_input(self.input)
        LAYOUTS[self.task].check(self.task, self.outputs)
        for name, (tasks, holds) in TASK_SPECS.items():
            spec = getattr(self, name)
            if self.task in tasks:
                if spec is None:
                    raise ContractError(f"{name}: required for {self.task} ({holds})")
                spec.validate()
            elif spec is not None:
                raise ContractError(f"{name}: not part of a {self.task} model's contract")
        b = self.batch
        if b.dynamic and b.size is not None:
            raise ContractError("batch.size: must be null when batch.dynamic is true")
        if not b.dynamic and (b.size is None or b.size < 1):
            raise ContractError("batch.size: a fixed batch (batch.dynamic false) needs a size >= 1")


COLORS = {3: "RGB", 1: "L"}  # channels -> the colour model the service converts uploads to


def _validate_input(i: InputSpec) -> None:
    fixed = {"layout": "NHWC", "dtype": "uint8"}
    for name, want in fixed.items():
        if getattr(i, name) != want:
            raise ContractError(f"input.{name}: must be {want!r} (the service feeds uint8 NHWC), "
                                f"got {getattr(i, name)!r}")
    if i.channels not in COLORS:
        raise ContractError(f"input.channels: must be 3 (RGB) or 1 (greyscale), got {i.channels!r}")
    if i.color != COLORS[i.channels]:
        raise ContractError(f"input.color: must be {COLORS[i.channels]!r} for {i.channels} channel(s), got {i.color!r}")
    if not i.name:
        raise ContractError("input.name: empty")
    for name in ("height", "width"):
        if not 1 <= getattr(i, name) <= MAX_SIDE:
            raise ContractError(f"input.{name}: must be in 1..{MAX_SIDE}, got {getattr(i, name)}")
    if i.resize not in RESIZE_POLICIES:
        raise ContractError(f"input.resize: must be one of {RESIZE_POLICIES}, got {i.resize!r}")
    if not 0 <= i.pad_value <= 255:
        raise ContractError(f"input.pad_value: must be in 0..255, got {i.pad_value}")
    if not i.normalized_in_graph:
        raise ContractError("input.normalized_in_graph: false is not supported: the service feeds raw uint8 "
                            "pixels, so conversion to float and mean/std must be inside the graph "
                            "(export.onnx_export puts them there)")


# --- typed parsing -----------------------------------------------------------------------

def _kind(value: Any) -> str:
    """'a string 'ab'', 'an object', ...: what a wrong value is, for error messages."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    if isinstance(value, (bool, int, float, str)):
        text = repr(value)
        kind += " " + (text if len(text) <= 40 else text[:37] + "...")
    return kind


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _build(cls: type, doc: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``doc``, checking each field against its type hint."""
    if not isinstance(doc, dict):
        raise ContractError(f"{where or 'contract'}: expected an object, got {_kind(doc)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        raise ContractError(f"{_path(where, unknown[0])}: unknown field (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in doc:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ContractError(f"{_path(where, name)}: required field missing")
            continue
        kwargs[name] = _check(doc[name], hints[name], _path(where, name))
    return cls(**kwargs)


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it matches the type ``hint`` (str, int, float, bool, X | None, list[str],
    dict[str, Any], nested dataclasses); ContractError naming ``where`` otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ContractError(f"{where}: expected a list, got {_kind(value)}")
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected an object, got {_kind(value)}")
        return dict(value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a hint this parser was not written for
        raise TypeError(f"contract field {where} has an unsupported type {hint!r}")
    if not ok:
        want = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[hint]
        raise ContractError(f"{where}: expected {want}, got {_kind(value)}")
    return value


# --- the contract against a graph ---------------------------------------------------------

IOSpec = tuple[str, str, list[Any]]  # (name, "tensor(<element type>)", shape: ints or symbolic names)


def check_io(contract: ModelContract, inputs: Iterable[IOSpec], outputs: Iterable[IOSpec]) -> None:
    """Check the contract against the graph's inputs and outputs (ContractError if they disagree).

    Element types are ONNX Runtime style strings ("tensor(uint8)"); shape entries are ints
    for fixed dimensions and strings or None for symbolic ones. Output ranks must be what the
    task says one image's outputs have, plus the batch axis (which only a fixed batch of 1
    may leave out).
    """
    inputs, outputs = list(inputs), list(outputs)
    spec = contract.input
    if len(inputs) != 1:
        raise ContractError(f"input.name: the graph must take exactly one input, takes {[n for n, _, _ in inputs]}")
    name, etype, shape = inputs[0]
    if name != spec.name:
        raise ContractError(f"input.name: the graph's input is named {name!r}, the contract says {spec.name!r}")
    if etype != "tensor(uint8)":
        raise ContractError(f"input.dtype: the graph's input {name!r} is {etype}, not uint8")
    if len(shape) != 4 or list(shape[1:]) != [spec.height, spec.width, spec.channels]:
        raise ContractError(f"input: the graph's input shape {shape} is not "
                            f"[N, {spec.height}, {spec.width}, {spec.channels}]")
    n = shape[0]
    if contract.batch.dynamic and isinstance(n, int):
        raise ContractError(f"batch.dynamic: true, but the graph's batch axis is fixed at {n}")
    if not contract.batch.dynamic and isinstance(n, int) and n != contract.batch.size:
        raise ContractError(f"batch.size: the contract says {contract.batch.size}, the graph's batch axis is {n}")
    shapes = {n: s for n, _, s in outputs}
    layout = LAYOUTS[contract.task]
    for field_name, tensor in layout.named(contract.outputs).items():
        if tensor not in shapes:
            raise ContractError(f"outputs.{field_name}: the graph has no output named {tensor!r} "
                                f"(has {sorted(shapes)})")
        shape, image_rank = shapes[tensor], layout.image_rank(field_name, contract.outputs.kind)
        allowed = {image_rank + 1} | ({image_rank} if contract.batch.max_size == 1 else set())
        if len(shape) not in allowed:
            raise ContractError(f"outputs.{field_name}: output {tensor!r} has rank {len(shape)}; a "
                                f"{contract.task} {field_name} output has rank {image_rank} per image, "
                                f"plus the batch axis")
        if contract.keypoints is not None and tensor == contract.outputs.keypoints:
            want = [len(contract.keypoints.names), 3]
            if any(isinstance(d, int) and d != w for d, w in zip(shape[-2:], want)):
                raise ContractError(f"outputs.keypoints: output {tensor!r} has shape {shape}; its last axes must "
                                    f"be {want} (the contract's keypoints, then x, y, confidence)")
        if contract.embedding is not None and tensor == contract.outputs.embedding:
            if isinstance(shape[-1], int) and shape[-1] != contract.embedding.dimension:
                raise ContractError(f"embedding.dimension: the contract says {contract.embedding.dimension}, the "
                                    f"graph's {tensor!r} output has {shape[-1]}")
        if contract.batch.dynamic and isinstance(shape[0], int):
            raise ContractError(f"outputs.{field_name}: output {tensor!r} has a fixed batch axis of {shape[0]}, "
                                "but the contract says the batch is dynamic")
