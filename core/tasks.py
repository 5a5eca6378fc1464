"""The tasks convserve trains, exports, evaluates and serves, each declared once.

A :class:`Task` says what a model of that task outputs (which contract fields name which
tensors, and their rank for one image), how one image's outputs become a JSON-ready
result, the options a request may set, its HTTP endpoint, the metric that ranks
checkpoints, how a dataset of that task is read and how predictions are scored. Everything
else looks tasks up in :data:`TASKS` (or :data:`BY_ENDPOINT`) instead of testing names.

The table itself is plain data: the modules that compute (NumPy, Pillow, pycocotools) are
imported where a method needs them, so reading the table (the HTTP routes, the serving
supervisor that loads them) costs no image or array stack.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from core.errors import ContractError, DatasetError, InvalidOption

if TYPE_CHECKING:
    import numpy as np

    from core.contract import ModelContract, OutputSpec
    from core.datasets import CocoDetection, ImageFolder, Sample, SegmentationFolder
    from core.geometry import Geometry

Outputs = dict[str, "np.ndarray"]  # one image's (or one batch's) output tensors by graph output name
MASK_FORMATS = ("rle", "polygon", "png")  # segmentation answers: core.postprocess.segments
OUTPUT_FIELDS = ("scores", "boxes", "labels", "count", "masks", "embedding", "cam")  # OutputSpec's tensor fields


@dataclass(frozen=True)
class Option:
    """A request option: parsed from a form field or query parameter, range-checked."""

    name: str
    type: type  # int, float, bool or str
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, raw: str) -> Any:
        """The typed value of ``raw``; InvalidOption naming this option otherwise."""
        text = raw.strip()
        if self.type is bool:
            lowered = text.lower()
            if lowered not in _BOOLEANS:
                raise InvalidOption(self.name, f"expected true or false, got {raw[:40]!r}")
            return _BOOLEANS[lowered]
        if self.type is int:
            try:
                value: Any = int(text)
            except ValueError:
                raise InvalidOption(self.name, f"expected an integer, got {raw[:40]!r}") from None
        elif self.type is float:
            try:
                value = float(text)
            except ValueError:
                raise InvalidOption(self.name, f"expected a number, got {raw[:40]!r}") from None
            if not math.isfinite(value):
                raise InvalidOption(self.name, f"expected a finite number, got {raw[:40]!r}")
        else:
            value = text
            if self.choices and value not in self.choices:
                raise InvalidOption(self.name, f"must be one of {', '.join(self.choices)}; got {raw[:40]!r}")
        if self.minimum is not None and value < self.minimum:
            raise InvalidOption(self.name, f"must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidOption(self.name, f"must be <= {self.maximum}, got {value}")
        return value

    def json_schema(self) -> dict[str, Any]:
        """This option as an OpenAPI/JSON schema."""
        schema: dict[str, Any] = {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[self.type],
                                  "default": self.default, "description": self.description}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.choices:
            schema["enum"] = list(self.choices)
        return schema


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


class Scorer(Protocol):
    """Accumulates one image's predictions at a time; ``compute`` gives the task's metrics."""

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None: ...

    def compute(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Task(ABC):
    """One task: see the module docstring. Subclasses fill in the fields and three methods."""

    name: str
    endpoint: str             # POST /<endpoint>
    summary: str              # one line for the API documentation
    result_key: str           # the key of the per-image result list in the JSON answer
    metric: str               # the validation metric that ranks checkpoints (higher is better)
    default_resize: str       # how export.onnx_export fits images to the input
    kinds: tuple[str, ...]    # allowed outputs.kind values
    image_ranks: Mapping[str, Mapping[str, int]]  # output field -> kind -> rank of one image's tensor
    optional: tuple[str, ...] = ()                 # output fields that may be left out
    options: tuple[Option, ...] = field(default=())
    result_in_thread: bool = False  # the result costs milliseconds (masks): keep it off the event loop
    requires: tuple[str, ...] = ()  # OutputSpec fields a model must name to be served by this endpoint

    # --- what the outputs are ---------------------------------------------------------

    def check_outputs(self, spec: "OutputSpec") -> None:
        """ContractError naming the field if ``spec`` is not a valid output spec for this task."""
        if spec.kind not in self.kinds:
            raise ContractError(f"outputs.kind: a {self.name} model's must be one of {self.kinds}, got {spec.kind!r}")
        for name in self.image_ranks:
            if name not in self.optional and not getattr(spec, name):
                raise ContractError(f"outputs.{name}: required for {self.name} (the graph output it names)")
        others = [f for f in OUTPUT_FIELDS if f not in self.image_ranks]
        for name in others:
            if getattr(spec, name):
                raise ContractError(f"outputs.{name}: not an output of a {self.name} model")
        if spec.max_detections is not None and spec.max_detections < 1:
            raise ContractError(f"outputs.max_detections: must be >= 1, got {spec.max_detections}")

    def named_outputs(self, spec: "OutputSpec") -> dict[str, str]:
        """Contract field -> graph output name, for the fields ``spec`` sets."""
        return {f: getattr(spec, f) for f in self.image_ranks if getattr(spec, f)}

    def image_rank(self, output_field: str, kind: str) -> int:
        ranks = self.image_ranks[output_field]
        return ranks.get(kind, ranks.get("*", -1))

    def split(self, outputs: Outputs, count: int, spec: "OutputSpec") -> list[Outputs]:
        """A batch's outputs -> one dict per image. An output without a batch axis (a fixed
        batch of 1 may leave it out) belongs to the single image as it is."""
        per_image: list[Outputs] = [{} for _ in range(count)]
        for field_name, tensor in self.named_outputs(spec).items():
            value = outputs[tensor]
            rank = self.image_rank(field_name, spec.kind)
            if value.ndim == rank + 1 and value.shape[0] >= count:
                for i in range(count):
                    per_image[i][tensor] = value[i]
            elif value.ndim == rank and count == 1:
                per_image[0][tensor] = value
            else:
                raise ValueError(f"output {tensor!r} has shape {value.shape}; expected rank {rank} per image "
                                 f"plus a batch axis of at least {count}")
        return per_image

    # --- requests ---------------------------------------------------------------------

    def serves(self, contract: "ModelContract") -> bool:
        """Whether a model with ``contract`` can answer this endpoint (its task and outputs)."""
        return contract.task == self.name and all(getattr(contract.outputs, f) for f in self.requires)

    def check_request(self, contract: "ModelContract", options: Mapping[str, Any]) -> None:
        """InvalidOption when ``options`` ask for something this model does not carry."""

    def heavy_result(self, options: Mapping[str, Any]) -> bool:
        """Whether computing the result takes milliseconds (then it runs off the event loop)."""
        return self.result_in_thread

    def parse_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        """Typed options from raw strings (form fields or query parameters); defaults filled in.
        Unknown names are InvalidOption errors."""
        known = {o.name: o for o in self.options}
        for name in raw:
            if name not in known:
                raise InvalidOption(name, f"unknown option for /{self.endpoint}; known: {', '.join(known) or 'none'}")
        return {name: (o.parse(raw[name]) if name in raw else o.default) for name, o in known.items()}

    @abstractmethod
    def result(self, outputs: Outputs, geometry: Geometry, contract: "ModelContract",
               options: Mapping[str, Any]) -> dict[str, Any]:
        """One image's outputs -> its JSON-ready result (``{result_key: [...]}`` and extras)."""

    # --- evaluation -------------------------------------------------------------------

    @abstractmethod
    def read_dataset(self, root: Path, verify: bool = True) -> Any:
        """The core.datasets reader for this task's on-disk format."""

    @abstractmethod
    def scorer(self, contract: "ModelContract", dataset: Any) -> Scorer:
        """A Scorer for predictions of a model with ``contract`` on ``dataset``."""


# --- classification ----------------------------------------------------------------------

@dataclass(frozen=True)
class Classification(Task):
    def check_request(self, contract: "ModelContract", options: Mapping[str, Any]) -> None:
        if options.get("cam") and not contract.outputs.cam:
            raise InvalidOption("cam", "this model carries no class activation maps (export it with --cam; "
                                "/models lists each model's outputs)")

    def heavy_result(self, options: Mapping[str, Any]) -> bool:
        return bool(options.get("cam"))

    def result(self, outputs: Outputs, geometry: Geometry, contract: "ModelContract",
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        o = contract.outputs
        labels = postprocess.top_k(outputs[o.scores], o.kind, contract.labels, options["top_k"])
        if options.get("cam"):
            for label in labels:
                label["heatmap_png"] = postprocess.heatmap_png(outputs[o.cam][label["label_id"]], geometry,
                                                               contract.input)
        return {"labels": labels}


    def read_dataset(self, root: Path, verify: bool = True) -> ImageFolder:
        from core.datasets import ImageFolder

        return ImageFolder(root, verify=verify)

    def scorer(self, contract: "ModelContract", dataset: ImageFolder) -> Scorer:
        unknown = [c for c in dataset.classes if c not in contract.labels]
        if unknown:
            raise DatasetError(f"{dataset.root}: class folders {unknown} are not among the model's labels {contract.labels}")
        return _ClassificationScorer(contract, [contract.labels.index(c) for c in dataset.classes])


@dataclass(frozen=True)
class Embedding(Classification):
    """/embed: a classifier's penultimate features, L2-normalised (similarity search)."""

    def check_request(self, contract: "ModelContract", options: Mapping[str, Any]) -> None:
        pass

    def heavy_result(self, options: Mapping[str, Any]) -> bool:
        return False

    def result(self, outputs: Outputs, geometry: Geometry, contract: "ModelContract",
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        vector = postprocess.l2_normalize(outputs[contract.outputs.embedding])
        return {"embedding": [round(float(v), 7) + 0.0 for v in vector], "dimensions": int(vector.shape[0])}  # no -0.0


class _ClassificationScorer:
    def __init__(self, contract: "ModelContract", label_of_class: list[int]) -> None:
        from core.metrics import ClassificationMeter

        self.tensor, self.label_of_class = contract.outputs.scores, label_of_class
        self.meter = ClassificationMeter(len(contract.labels))

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None:
        import numpy as np

        self.meter.update(outputs[self.tensor][None], np.array([self.label_of_class[sample.target]]))

    def compute(self) -> dict[str, Any]:
        return self.meter.compute()


# --- detection ---------------------------------------------------------------------------

# COCO's protocol: up to 100 detections per image; a low floor keeps the precision-recall
# curve complete. Used by training-time validation and export.evaluate alike.
EVAL_SCORE_THRESHOLD = 0.001
EVAL_MAX_DETECTIONS = 100


@dataclass(frozen=True)
class Detection(Task):
    def result(self, outputs: Outputs, geometry: Geometry, contract: "ModelContract",
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        o = contract.outputs
        return {"detections": postprocess.detections(outputs[o.boxes], outputs[o.scores], outputs[o.labels], geometry,
                                                     contract.labels, options["score_threshold"],
                                                     options["max_detections"])}

    def read_dataset(self, root: Path, verify: bool = True) -> CocoDetection:
        from core.datasets import CocoDetection

        return CocoDetection(root, verify=verify)

    def scorer(self, contract: "ModelContract", dataset: CocoDetection) -> Scorer:
        return _DetectionScorer(self, contract, dataset)


class _DetectionScorer:
    """COCO mAP of the detections the service would return (score >= 0.001, top 100)."""

    def __init__(self, task: Detection, contract: "ModelContract", dataset: CocoDetection) -> None:
        self.task, self.contract, self.dataset = task, contract, dataset
        self.category_of = dict(zip(dataset.classes, dataset.category_ids))
        self.options = {"score_threshold": EVAL_SCORE_THRESHOLD, "max_detections": EVAL_MAX_DETECTIONS}
        self.detections: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None:
        target = sample.target  # a core.datasets.CocoImage
        self.image_ids.append(target.image_id)
        for d in self.task.result(outputs, geometry, self.contract, self.options)["detections"]:
            category = self.category_of.get(d["label"])
            if category is None:  # e.g. a background class the dataset does not list
                continue
            x1, y1, x2, y2 = d["box"]
            self.detections.append({"image_id": target.image_id, "category_id": category,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]})

    def compute(self) -> dict[str, Any]:
        from core.metrics import coco_detection_metrics

        return coco_detection_metrics(self.dataset.coco, self.detections, self.image_ids)


# --- segmentation ------------------------------------------------------------------------

@dataclass(frozen=True)
class Segmentation(Task):
    def result(self, outputs: Outputs, geometry: Geometry, contract: "ModelContract",
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        o = contract.outputs
        return postprocess.segments(postprocess.class_map(outputs[o.masks], o.kind, geometry), contract.labels,
                                    options["mask_format"])

    def read_dataset(self, root: Path, verify: bool = True) -> SegmentationFolder:
        from core.datasets import SegmentationFolder

        return SegmentationFolder(root, verify=verify)

    def scorer(self, contract: "ModelContract", dataset: SegmentationFolder) -> Scorer:
        if dataset.classes != contract.labels:
            raise DatasetError(f"{dataset.root}/classes.txt lists {dataset.classes}; the model's labels are {contract.labels}")
        return _SegmentationScorer(contract, dataset)


class _SegmentationScorer:
    """Confusion-matrix IoU of class maps at the original image size."""

    def __init__(self, contract: "ModelContract", dataset: SegmentationFolder) -> None:
        from core.metrics import ConfusionMatrix

        self.contract, self.dataset = contract, dataset
        self.matrix = ConfusionMatrix(len(contract.labels))

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None:
        from core import postprocess

        o = self.contract.outputs
        cmap = postprocess.class_map(outputs[o.masks], o.kind, geometry)
        truth = self.dataset.load_mask(sample.target, (geometry.orig_width, geometry.orig_height))
        self.matrix.update(cmap, truth)

    def compute(self) -> dict[str, Any]:
        return self.matrix.compute(self.contract.labels)


# --- the table ---------------------------------------------------------------------------

_MODEL = Option("model", str, "", "model name or name:version; empty = the default model of this task")
_CLASSIFICATION_RANKS = {"scores": {"*": 1}, "embedding": {"*": 1}, "cam": {"*": 3}}

TASKS: dict[str, Task] = {t.name: t for t in (
    Classification(
        name="classification", endpoint="classify", result_key="labels", metric="top1", default_resize="stretch",
        summary="Top-k labels with softmax scores, best first.",
        kinds=("logits", "probabilities"), image_ranks=_CLASSIFICATION_RANKS, optional=("embedding", "cam"),
        options=(_MODEL, Option("top_k", int, 5, "how many labels to return, best first", 1, 1000),
                 Option("cam", bool, False, "also return, per label, heatmap_png: its class activation map as a "
                        "base64 greyscale PNG at the original image size (models exported with --cam)"))),
    Detection(
        name="detection", endpoint="detect", result_key="detections", metric="map_50", default_resize="letterbox",
        summary="Boxes [x1, y1, x2, y2] in original image pixels, with label and score, best first.",
        kinds=("boxes",), image_ranks={"boxes": {"*": 2}, "scores": {"*": 1}, "labels": {"*": 1}, "count": {"*": 0}},
        optional=("count",),
        options=(_MODEL,
                 Option("score_threshold", float, 0.3, "drop detections scoring below this", 0.0, 1.0),
                 Option("max_detections", int, 100, "keep at most this many detections, best first", 1, 1000))),
    Segmentation(
        name="segmentation", endpoint="segment", result_key="classes", metric="miou", default_resize="stretch",
        summary="Per-class masks at original image size, with pixel areas and bounding boxes.",
        kinds=("mask_logits", "class_map"), image_ranks={"masks": {"mask_logits": 3, "class_map": 2}},
        result_in_thread=True,
        options=(_MODEL, Option("mask_format", str, "rle", "rle: COCO RLE per class; polygon: COCO polygons; "
                                "png: one base64 class-index PNG", choices=MASK_FORMATS))),
)}
BY_ENDPOINT: dict[str, Task] = {t.endpoint: t for t in TASKS.values()}
# Every POST route: one per task, plus /embed (classification models exported with an embedding).
ENDPOINTS: dict[str, Task] = {**BY_ENDPOINT, "embed": Embedding(
    name="classification", endpoint="embed", result_key="embedding", metric="top1", default_resize="stretch",
    summary="The image's embedding: a classifier's penultimate features, L2-normalised (cosine similarity = dot product).",
    kinds=("logits", "probabilities"), image_ranks=_CLASSIFICATION_RANKS, optional=("embedding", "cam"),
    requires=("embedding",), options=(Option("model", str, "", "model name or name:version; empty = the first "
                                             "classification model with an embedding output"),))}
