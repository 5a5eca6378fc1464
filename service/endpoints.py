"""The HTTP endpoints convserve answers with a task's result: ``POST /<endpoint>``.

An :class:`Endpoint` is what HTTP adds to a task (core.tasks): its path, a summary for the
API documentation, the request options with their ranges and OpenAPI schemas, which models
it serves (a task, plus the outputs it needs), whether its result is heavy enough to leave
the event loop, and how one image's outputs become its JSON answer. One endpoint per task
(``/classify``, ``/detect``, ``/segment``, ``/instances``, ``/keypoints``, ``/embed``) answers with the
task's own result; ``/embed`` (the embedding task's) also answers classification models that
carry an embedding output (their penultimate features).

Plain data, like core.tasks: reading the table (the routes, BentoML's supervisor) loads no
array stack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import InvalidOption
from core.tasks import MASK_FORMATS, TASKS, Outputs, Task

if TYPE_CHECKING:
    from core.contract import ModelContract
    from core.geometry import Geometry

_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


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
        if self.type in (int, float):
            want = "an integer" if self.type is int else "a number"
            try:
                if not text.isascii():  # int() and float() read other scripts' digits too ('٣' is 3)
                    raise ValueError(text)
                value: Any = self.type(text)
            except ValueError:
                raise InvalidOption(self.name, f"expected {want}, got {raw[:40]!r}") from None
            if not math.isfinite(value):  # float() reads nan and inf
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
        schema: dict[str, Any] = {"type": _JSON_TYPES[self.type], "default": self.default,
                                  "description": self.description}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.choices:
            schema["enum"] = list(self.choices)
        return schema


Result = Callable[[Outputs, "Geometry", "ModelContract", Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Endpoint:
    """``POST /<name>``: see the module docstring."""

    name: str
    task: Task
    summary: str
    result: Result                     # one image's outputs -> its JSON answer
    result_key: str                    # the key of the per-image result list (the playground draws it)
    options: tuple[Option, ...] = ()   # ``model`` first
    requires: tuple[str, ...] = ()     # OutputSpec fields a model must name to be served here
    heavy_options: tuple[str, ...] = ()  # true boolean options that make the result cost milliseconds
    heavy: bool = False                # the result costs milliseconds whatever the options (masks)
    drawable: bool = True              # render=png|jpeg draws the answer on the image (service.render)
    also_tasks: tuple[str, ...] = ()   # other tasks whose models serve here when they carry ``requires``

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks whose models this endpoint serves, its own first."""
        return (self.task.name, *self.also_tasks)

    def serves(self, contract: ModelContract) -> bool:
        """Whether a model with ``contract`` can answer this endpoint (its task and outputs)."""
        return contract.task in self.tasks and all(getattr(contract.outputs, f) for f in self.requires)

    def check_request(self, contract: ModelContract, options: Mapping[str, Any]) -> None:
        """InvalidOption when ``options`` ask for an output this model does not carry."""
        for name in self.heavy_options:
            if options.get(name) and not getattr(contract.outputs, name):
                raise InvalidOption(name, f"this model carries no {_OUTPUT_NAMES[name]} (export it with --{name}; "
                                    "/models lists each model's outputs)")

    def heavy_result(self, options: Mapping[str, Any]) -> bool:
        """Whether computing the result takes milliseconds (then it runs off the event loop)."""
        return self.heavy or any(options.get(name) for name in self.heavy_options)

    def parse_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        """Typed options from raw strings (form fields or query parameters); defaults filled in.
        Unknown names are InvalidOption errors."""
        return parse_options(self.options, raw, f"/{self.name}")


def parse_options(options: tuple[Option, ...], raw: Mapping[str, str], route: str) -> dict[str, Any]:
    """``options`` typed from raw strings (form fields or query parameters), defaults filled in;
    a name that is not one of them is an InvalidOption naming ``route`` and the known ones."""
    known = {o.name: o for o in options}
    for name in raw:
        if name not in known:
            raise InvalidOption(name, f"unknown option for {route}; known: {', '.join(known) or 'none'}")
    return {name: (o.parse(raw[name]) if name in raw else o.default) for name, o in known.items()}


_OUTPUT_NAMES = {"cam": "class activation maps"}
_MODEL = Option("model", str, "", "model name or name:version; empty = the default model of this task")


def _option(task: str, name: str, type_: type, description: str, *args: Any, **kw: Any) -> Option:
    """An option for one of ``task``'s result parameters: its default is the task's."""
    return Option(name, type_, TASKS[task].defaults[name], description, *args, **kw)


def _endpoint(name: str, task: str, summary: str, options: tuple[Option, ...] = (), model: Option = _MODEL,
              **kw: Any) -> Endpoint:
    t = TASKS[task]
    kw.setdefault("result", t.result)
    kw.setdefault("result_key", t.result_key)
    return Endpoint(name=name, task=t, summary=summary, options=(model, *options), **kw)


# Options a video adds to every endpoint's own (service.video).
FRAME_STEP = Option("frame_step", int, 1, "videos only: answer every n-th frame (1: every frame)", 1, 10_000)
VIDEO_OPTIONS = (FRAME_STEP,)

# Every POST route: one per task.
ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (
    _endpoint("classify", "classification", "Top-k labels with softmax scores, best first.",
              options=(_option("classification", "top_k", int, "how many labels to return, best first", 1, 1000),
                       _option("classification", "cam", bool, "also return, per label, heatmap_png: its class "
                               "activation map as a base64 greyscale PNG at the original image size, scaled down to "
                               "at most 1024 px on the long side (models exported with --cam)")),
              heavy_options=("cam",)),
    _endpoint("detect", "detection", "Boxes [x1, y1, x2, y2] in original image pixels, with label and score, "
              "best first.",
              options=(_option("detection", "score_threshold", float, "drop detections scoring below this", 0.0, 1.0),
                       _option("detection", "max_detections", int, "keep at most this many detections, best first",
                               1, 1000))),
    _endpoint("segment", "segmentation", "Per-class masks at original image size, with pixel areas and bounding "
              "boxes.", heavy=True,
              options=(_option("segmentation", "mask_format", str, "rle: COCO RLE per class; polygon: COCO polygons; "
                               "png: one base64 class-index PNG", choices=MASK_FORMATS),)),
    _endpoint("instances", "instance_segmentation", "Objects with their own masks: per object a box [x1, y1, x2, "
              "y2], label and score as /detect gives them, its pixel area and its mask at the original image size "
              "(COCO RLE by default), best object first; touching objects of one class come back apart.",
              heavy=True,
              options=(_option("instance_segmentation", "score_threshold", float, "drop objects scoring below this",
                               0.0, 1.0),
                       _option("instance_segmentation", "max_detections", int,
                               "keep at most this many objects, best first", 1, 1000),
                       _option("instance_segmentation", "mask_format", str, "rle: COCO RLE of the whole image per "
                               "object; polygon: COCO polygons; png: a base64 PNG of the mask inside mask_box",
                               choices=MASK_FORMATS))),
    _endpoint("keypoints", "keypoints", "Objects with their named keypoints: per object a box [x1, y1, x2, y2], label "
              "and score as /detect gives them, and one {name, x, y, score} per keypoint of the model's skeleton "
              "(x, y in original image pixels; score the keypoint's confidence), best object first.",
              options=(_option("keypoints", "score_threshold", float, "drop objects scoring below this", 0.0, 1.0),
                       _option("keypoints", "max_detections", int, "keep at most this many objects, best first",
                               1, 1000))),
    _endpoint("embed", "embedding", "The image's embedding, L2-normalised (cosine similarity = dot product): an "
              "embedding model's metric-learned vector, or a classifier's penultimate features.",
              requires=("embedding",), drawable=False, also_tasks=("classification",),
              model=Option("model", str, "", "model name or name:version; empty = the first embedding model, "
                                  "else the first classification model with an embedding output")),
)}
# The endpoint that answers with each task's own result (GET /models names it per model).
TASK_ENDPOINTS: dict[str, Endpoint] = {e.task.name: e for e in ENDPOINTS.values() if e.result == e.task.result}
