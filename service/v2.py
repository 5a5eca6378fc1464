"""The Open Inference Protocol v2 (KServe v2, as Triton and OpenVINO Model Server speak it)
over REST, for every model of the repository: the messages, without any HTTP.

service.app routes ``/v2...`` here. Per model:

- **metadata**: the graph's input (``UINT8 [-1, H, W, C]``), its outputs by name, and the
  task results as tensors: ``detection_boxes`` FP32 [N, K, 4] (original pixels, xyxy),
  ``detection_scores`` FP32 [N, K], ``detection_classes`` INT64 [N, K], ``num_detections``
  INT32 [N]; ``class_map`` UINT8 [N, H, W] (original size; 255 pads images smaller than the
  largest of the request); for keypoint models the detection tensors and ``detection_keypoints`` FP32
  [N, K, P, 3] (x, y in original pixels, confidence; P the contract's keypoints.names); for
  instance segmentation models the detection tensors and ``detection_masks`` BYTES [N, K]
  (each object's mask as a JSON COCO RLE of the whole image).
  Classification results come through the classification
  extension: ``{"name": "logits", "parameters": {"classification": k}}`` answers BYTES
  [N, k] strings ``score:index:label``, with the scores /classify reports (softmax).
- **inputs**: one tensor named like the model's input, either BYTES of shape [N] (encoded
  images, decoded and prepared exactly as the task endpoints do: the convention of
  OpenVINO Model Server; in JSON each element is the image in base64, a plain string or
  ``{"b64": ...}``, since JSON strings cannot carry binary), or the model's own UINT8 NHWC
  tensor for clients that prepare images themselves.
- **data**: JSON ``data`` arrays, or the binary tensor data extension
  (``Inference-Header-Content-Length``; ``binary_data_size`` per input; ``binary_data`` per
  output or ``binary_data_output`` for all).
- **options**: request ``parameters`` may set the task options (``score_threshold``,
  ``max_detections``); other parameters are ignored, as the protocol allows.

Every problem is a :class:`V2Error` with a 4xx status and a message naming it; the HTTP
layer answers ``{"error": "..."}``. Imported by service.app only when a v2 route is used
(it loads NumPy and ONNX Runtime, which BentoML's supervising process never needs).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from core import postprocess
from core.contract import ModelContract
from core.errors import ImageTooLarge, InvalidImage
from core.geometry import Geometry
from core.tasks import TASKS, Outputs
from service.endpoints import TASK_ENDPOINTS
from service.errors import V2Error

if TYPE_CHECKING:
    from service.pipeline import Inferred, Pipeline
    from service.repository import ServedModel

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
HEADER_LENGTH = "inference-header-content-length"
MAX_DATA_DEPTH = 8        # a tensor's JSON 'data' nests at most as deep as its rank (4 for images), and a little
JSON_SLACK_ELEMENTS = 4096  # JSON values a request may hold besides its tensor's elements (names, parameters)

TO_V2 = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
          "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
          "float32": "FP32", "float64": "FP64", "object": "BYTES"}
_ORT_TO_V2 = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(int8)": "INT8", "tensor(int32)": "INT32",
              "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
              "tensor(string)": "BYTES"}
CLASS_MAP_PAD = 255


# --- task results as tensors -------------------------------------------------------------------

@dataclass(frozen=True)
class TaskTensors:
    """A task's results as v2 outputs: name -> (datatype, shape), and how to compute them for
    a request's images (arrays with a batch axis, by name)."""

    outputs: dict[str, tuple[str, list[int]]]
    compute: Callable[[list[Outputs], list[Geometry], ModelContract, Mapping[str, Any]], dict[str, np.ndarray]]


def detection_tensors(outputs: list[Outputs], geometries: list[Geometry], contract: ModelContract,
                      options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each image's detections, as /detect answers them, padded to the most any image has."""
    o = contract.outputs
    found = [postprocess.select_detections(out[o.boxes], out[o.scores], out[o.labels], g, options["score_threshold"],
                                           options["max_detections"]) for out, g in zip(outputs, geometries)]
    n, k = len(found), max((len(f[1]) for f in found), default=0)
    boxes, scores = np.zeros((n, k, 4), np.float32), np.zeros((n, k), np.float32)
    classes, count = np.zeros((n, k), np.int64), np.zeros((n,), np.int32)
    for i, (b, s, c) in enumerate(found):
        count[i] = len(s)
        boxes[i, :len(s)], scores[i, :len(s)], classes[i, :len(s)] = b, s, c
    return {"detection_boxes": boxes, "detection_scores": scores, "detection_classes": classes,
            "num_detections": count}


def keypoint_tensors(outputs: list[Outputs], geometries: list[Geometry], contract: ModelContract,
                     options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The detection tensors of the objects /keypoints answers, and their keypoints [N, K, P, 3]
    (original pixels, confidence), zero where an image has fewer objects than K."""
    o, p = contract.outputs, len(contract.keypoints.names)  # type: ignore[union-attr]
    tensors = detection_tensors(outputs, geometries, contract, options)
    n, k = tensors["detection_scores"].shape
    points = np.zeros((n, k, p, 3), np.float32)
    for i, (out, g) in enumerate(zip(outputs, geometries)):
        keep = postprocess.kept_detections(out[o.scores], options["score_threshold"], options["max_detections"])
        points[i, :len(keep)] = postprocess.keypoints_to_original(out[o.keypoints].reshape(-1, p, 3)[keep], g)
    return {**tensors, "detection_keypoints": points}


def instance_tensors(outputs: list[Outputs], geometries: list[Geometry], contract: ModelContract,
                     options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The detection tensors of the objects /instances answers, and their masks as BYTES [N, K]:
    each a JSON COCO RLE of the whole image, ``{"size": [h, w], "counts": ...}`` (b"" pads)."""
    tensors = detection_tensors(outputs, geometries, contract, options)
    n, k = tensors["detection_scores"].shape
    masks = np.full((n, k), b"", dtype=object)
    task = TASKS[contract.task]
    for i, (out, g) in enumerate(zip(outputs, geometries)):
        found = task.result(out, g, contract, {**options, "mask_format": "rle"})[task.result_key]
        for j, d in enumerate(found):
            masks[i, j] = json.dumps(d["rle"], separators=(",", ":")).encode()
    return {**tensors, "detection_masks": masks}


def class_map_tensors(outputs: list[Outputs], geometries: list[Geometry], contract: ModelContract,
                      options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each image's class map at its original size, padded with CLASS_MAP_PAD to the largest."""
    o = contract.outputs
    maps = [postprocess.class_map(out[o.masks], o.kind, g) for out, g in zip(outputs, geometries)]
    h, w = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
    stacked = np.full((len(maps), h, w), CLASS_MAP_PAD, np.uint8)
    for i, m in enumerate(maps):
        stacked[i, :m.shape[0], :m.shape[1]] = m
    return {"class_map": stacked}


# By task name. Classification results come through the classification extension instead.
_DETECTION_OUTPUTS = {"detection_boxes": ("FP32", [-1, -1, 4]), "detection_scores": ("FP32", [-1, -1]),
                      "detection_classes": ("INT64", [-1, -1]), "num_detections": ("INT32", [-1])}
TASK_TENSORS: dict[str, TaskTensors] = {
    "classification": TaskTensors({}, lambda *_: {}),
    "detection": TaskTensors(_DETECTION_OUTPUTS, detection_tensors),
    "instance_segmentation": TaskTensors({**_DETECTION_OUTPUTS, "detection_masks": ("BYTES", [-1, -1])},
                                         instance_tensors),
    "keypoints": TaskTensors({**_DETECTION_OUTPUTS, "detection_keypoints": ("FP32", [-1, -1, -1, 3])},
                             keypoint_tensors),
    "segmentation": TaskTensors({"class_map": ("UINT8", [-1, -1, -1])}, class_map_tensors),
    "embedding": TaskTensors({}, lambda *_: {}),  # the graph's own embedding output, FP32 [N, D]
}


def bad(message: str) -> V2Error:
    return V2Error(400, message)


# --- metadata --------------------------------------------------------------------------------

def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "convserve", "version": version, "extensions": EXTENSIONS}


def model_outputs(served: ServedModel) -> dict[str, tuple[str, list[int]]]:
    """Every output the model answers: the graph's (by the contract's names) and the task's."""
    graph = {o.name: o for o in served.model.session.get_outputs()}
    out: dict[str, tuple[str, list[int]]] = {}
    for name in served.model.output_names:
        o = graph[name]
        out[name] = (_ORT_TO_V2.get(o.type, "BYTES"), [d if isinstance(d, int) else -1 for d in o.shape])
    for name, spec in TASK_TENSORS[served.model.contract.task].outputs.items():
        out.setdefault(name, spec)
    return out


def model_metadata(served: ServedModel, versions: list[str]) -> dict[str, Any]:
    c = served.model.contract
    i = c.input
    return {
        "name": served.model.name, "versions": versions, "platform": PLATFORM,
        "inputs": [{"name": i.name, "datatype": "UINT8", "shape": [-1 if c.batch.dynamic else c.batch.size,
                                                                    i.height, i.width, i.channels]}],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in model_outputs(served).items()],
        "parameters": {"task": c.task, "labels": c.labels, "input_color": i.color, "input_resize": i.resize,
                       "bytes_input": "a BYTES tensor of shape [N] of encoded images is accepted too"},
    }


# --- requests --------------------------------------------------------------------------------

@dataclass
class Requested:
    name: str
    binary: bool
    classification: int | None = None


@dataclass
class InferRequest:
    id: str | None
    images: list[bytes] | None          # encoded images (BYTES input), or
    arrays: np.ndarray | None           # model-ready uint8 [N, H, W, C] (UINT8 input)
    outputs: list[Requested]
    options: dict[str, str] = field(default_factory=dict)  # task options, as raw strings
    explicit: bool = True  # the request named its outputs (else: every output that applies)

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.arrays)  # type: ignore[arg-type]


def _elements(data: Any, count: int, where: str) -> list[Any]:
    """The elements of a (nested) JSON ``data`` array, flattened without recursion; stops as
    soon as there are more than ``count`` or the nesting is deeper than the shape can be."""
    out: list[Any] = []
    stack = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth > MAX_DATA_DEPTH:
                raise bad(f"{where}: 'data' is nested deeper than {MAX_DATA_DEPTH} levels")
            stack.extend((x, depth + 1) for x in reversed(item))
        else:
            out.append(item)
            if len(out) > count:
                break
    if len(out) != count:
        raise bad(f"{where}: 'data' holds {'more than ' if len(out) > count else ''}{len(out)} elements; "
                  f"its shape says {count}")
    return out


def _parse_bytes_binary(raw: bytes, count: int, where: str) -> list[bytes]:
    """BYTES in the binary extension: each element a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    for k in range(count):
        if pos + 4 > len(raw):
            raise bad(f"{where}: binary data ends inside the length of element {k}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise bad(f"{where}: element {k} says {n} bytes; only {len(raw) - pos} remain")
        out.append(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise bad(f"{where}: {len(raw) - pos} bytes of binary data left over after {count} elements")
    return out


def _b64(item: Any, where: str) -> bytes:
    if isinstance(item, dict) and set(item) == {"b64"}:
        item = item["b64"]
    if not isinstance(item, str):
        raise bad(f"{where}: a BYTES element in JSON must be the image in base64 (a string or {{\"b64\": ...}}), "
                  f"got {type(item).__name__}")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where}: not valid base64 (in JSON, encode the image bytes in base64)") from None


def _shape(spec: dict[str, Any], where: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"{where}: 'shape' must be a list of non-negative integers")
    return shape


def header_length(headers: dict[str, str]) -> int | None:
    """The Inference-Header-Content-Length (ASCII digits only); None without one; V2Error."""
    raw = headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise bad(f"Inference-Header-Content-Length {raw[:40]!r} is not a number of bytes")
    return int(text)


def _json_head(head: bytes, served: ServedModel, max_images: int) -> Any:
    """The parsed JSON request, after cheap checks that bound what parsing costs: no more
    values than the largest request the model accepts can hold (counted by commas, before
    anything is parsed); nesting is bounded by the decoder's recursion limit."""
    i = served.model.contract.input
    most = max_images * max(i.height * i.width * i.channels, 1) + JSON_SLACK_ELEMENTS
    if head.count(b",") > most:
        raise V2Error(413, f"the JSON request holds more values than {max_images} image(s) of this model can "
                           f"({most}); send images as BYTES or use the binary tensor data extension")
    try:
        return json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the request is not valid JSON: {exc}") from None
    except RecursionError:  # CPython's decoder stops at the interpreter's recursion limit (1000)
        raise bad("the JSON request is nested too deeply") from None


def parse_infer(body: bytes, header_length: int | None, served: ServedModel, max_images: int) -> InferRequest:
    """Parse and check an infer request for ``served``; V2Error naming the problem. Counts are
    checked before elements are read, so no request costs more than its size allows."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise bad(f"Inference-Header-Content-Length is {header_length}; the body has {len(body)} bytes")
        head, binary = body[:header_length], body[header_length:]
    else:
        head, binary = body, b""
    doc = _json_head(head, served, max_images)
    if not isinstance(doc, dict):
        raise bad("the request must be a JSON object with 'inputs'")
    inputs = doc.get("inputs")
    spec = served.model.contract.input
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad(f"'inputs' must list exactly one tensor, named {spec.name!r}")
    tensor = inputs[0]
    name = tensor.get("name")
    if name != spec.name:
        raise bad(f"unknown input {name!r}: this model's input is {spec.name!r}")
    where = f"input {name!r}"
    datatype = tensor.get("datatype")
    shape = _shape(tensor, where)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"{where}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(binary):
            raise bad(f"{where}: binary_data_size is {size!r}; the binary part of the body has {len(binary)} bytes")
        if "data" in tensor:
            raise bad(f"{where}: give 'data' or binary_data_size, not both")
    elif binary:
        raise bad(f"{where}: the body has {len(binary)} binary bytes but no input says binary_data_size")
    elif "data" not in tensor:
        raise bad(f"{where}: no 'data' and no binary_data_size")
    images, arrays = input_tensor(datatype, shape, binary if size is not None else None,
                                  lambda count: _elements(tensor["data"], count, where), served, max_images, where)
    doc_params = doc.get("parameters") or {}
    if not isinstance(doc_params, dict):
        raise bad("'parameters' must be an object")
    default_binary = doc_params.get("binary_data_output") is True
    outputs = requested_outputs(doc.get("outputs"), served, default_binary)
    endpoint = TASK_ENDPOINTS[served.model.contract.task]
    options = {o.name: option_text(doc_params[o.name]) for o in endpoint.options
               if o.name != "model" and o.name in doc_params}
    request_id = doc.get("id")
    return InferRequest(request_id if isinstance(request_id, str) else None, images, arrays, outputs, options,
                        explicit=doc.get("outputs") is not None)


def input_tensor(datatype: Any, shape: list[int], raw: bytes | None, elements: Callable[[int], list[Any]],
                 served: ServedModel, max_images: int, where: str) -> tuple[list[bytes] | None, np.ndarray | None]:
    """The images of an input tensor, from ``raw`` bytes (binary data) or else ``elements(n)``
    (the first n data elements, JSON or typed contents): encoded images for BYTES, the model's
    tensor for UINT8; V2Error naming the problem. Counts are checked before data is read.
    Shared by the REST and gRPC forms of the protocol."""
    spec = served.model.contract.input
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise bad(f"{where}: a BYTES input of encoded images has shape [N]; got {shape}")
        count = _checked_count(shape[0], max_images, where)
        if raw is not None:
            return _parse_bytes_binary(raw, count, where), None
        # Typed gRPC contents carry the bytes themselves; JSON carries them in base64.
        return [bytes(item) if isinstance(item, bytes) else _b64(item, f"{where} element {k}")
                for k, item in enumerate(elements(count))], None
    if datatype == "UINT8":
        want = [spec.height, spec.width, spec.channels]
        if len(shape) != 4 or shape[1:] != want:
            raise bad(f"{where}: a UINT8 input has the model's shape [N, {', '.join(map(str, want))}]; got {shape}")
        count = _checked_count(shape[0], max_images, where)
        total = math.prod(shape)  # Python integers: no overflow, and count is bounded already
        if raw is not None:
            if len(raw) != total:
                raise bad(f"{where}: shape {shape} needs {total} bytes of binary data; got {len(raw)}")
            return None, np.frombuffer(raw, np.uint8).reshape(shape)
        items = elements(total)
        if len(items) != total or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                          for v in items):
            raise bad(f"{where}: UINT8 data must be {total} integers in 0..255")
        return None, np.asarray(items, np.uint8).reshape(shape)
    raise bad(f"{where}: datatype {datatype!r} is not accepted: send BYTES (encoded images, shape [N]) or UINT8 "
              f"(the model's input, shape [N, {spec.height}, {spec.width}, {spec.channels}])")


def _checked_count(count: int, max_images: int, where: str) -> int:
    """The batch size of a request's shape, before any element is read: 1..max_images."""
    if count < 1:
        raise bad(f"{where}: the batch is empty")
    if count > max_images:
        raise V2Error(413, f"{where}: {count} images in one request; the limit is {max_images} (CONVSERVE_MAX_IMAGES)")
    return count


def option_text(value: Any) -> str:
    """A v2 parameter as the option text the endpoints parse (booleans as JSON spells them)."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def requested_outputs(raw: Any, served: ServedModel, default_binary: bool) -> list[Requested]:
    """The outputs a request names (``raw``: a list of {"name", "parameters"}; None: every
    output), checked against the model's; V2Error naming a bad one."""
    available = model_outputs(served)
    if raw is None:
        return [Requested(n, default_binary) for n in available]
    if not isinstance(raw, list) or not raw:
        raise bad("'outputs' must be a non-empty list of {\"name\": ...} objects")
    out = []
    scores = served.model.contract.outputs.scores
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad("each requested output needs a 'name'")
        name = item["name"]
        if name not in available:
            raise bad(f"unknown output {name!r}; this model answers {', '.join(available)}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad(f"output {name!r}: 'parameters' must be an object")
        binary = params.get("binary_data", default_binary)
        k = params.get("classification")
        if k is not None:
            if name != scores or scores is None:
                raise bad(f"output {name!r}: the classification extension applies to a classifier's scores "
                          f"output{f' ({scores!r})' if scores else ''}")
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise bad(f"output {name!r}: classification must be a positive integer, got {k!r}")
        out.append(Requested(name, bool(binary), k))
    return out


# --- running a request ---------------------------------------------------------------------

# Requests up to this size are parsed on the event loop (REST and gRPC): parsing one takes
# microseconds, while a hop to the decode pool waits behind other requests' decodes. (Not a
# throughput change measurable on 2 cores: the decodes and runs are 95% of a worker's time.)
INLINE_BYTES = 256 * 1024


async def run(pipeline: Pipeline, served: ServedModel, request: InferRequest
              ) -> tuple[list[tuple[Requested, np.ndarray]], Inferred]:
    """A parsed request through ``pipeline`` (encoded images decoded as the endpoints do, or the
    model's tensor as it is): its requested outputs, and the run's record. The REST and gRPC
    forms of the protocol both answer with this."""
    options = TASK_ENDPOINTS[served.model.contract.task].parse_options(request.options)
    if request.images is not None:
        try:
            inferred = await pipeline.run(served, request.images)
        except (InvalidImage, ImageTooLarge) as exc:
            raise type(exc)(f"input {served.model.contract.input.name!r}: {exc}") from None
    else:
        inferred = await pipeline.run_arrays(served, request.arrays)
    geometries = [p.geometry for p in inferred.prepared]
    args = (request, served, inferred.outputs, geometries, options)
    if TASK_ENDPOINTS[served.model.contract.task].heavy_result(options):  # masks: milliseconds
        return await pipeline.in_pool(response_tensors, *args), inferred
    return response_tensors(*args), inferred  # microseconds: a pool hop would queue behind decodes


# --- responses -------------------------------------------------------------------------------

def response_tensors(request: InferRequest, served: ServedModel, outputs: list[Outputs], geometries: list[Geometry],
                     options: Mapping[str, Any]) -> list[tuple[Requested, np.ndarray]]:
    """Every requested output as an array: classification strings, task tensors or the graph's
    own; without named outputs, a graph output with no batch form (one-image graphs give each
    image as many boxes as it found) is left to the task tensors."""
    contract = served.model.contract
    adapter = TASK_TENSORS[contract.task]
    wanted = {r.name for r in request.outputs}
    tensors = adapter.compute(outputs, geometries, contract, options) if wanted & set(adapter.outputs) else {}
    out = []
    for req in request.outputs:
        if req.classification is not None:
            out.append((req, classification_strings(served, outputs, req.classification)))
        elif req.name in tensors:
            out.append((req, tensors[req.name]))
        elif request.explicit or stackable(req.name, outputs):
            out.append((req, raw_tensor(req.name, outputs)))
    return out


def classification_strings(served: ServedModel, outputs: list[dict[str, np.ndarray]], k: int) -> np.ndarray:
    """BYTES [N, k] of ``score:index:label``, best first, with /classify's scores."""
    c = served.model.contract
    rows = []
    for o in outputs:
        top = postprocess.top_k(o[c.outputs.scores], c.outputs.kind, c.labels, k)
        rows.append([f"{t['score']}:{t['label_id']}:{t['label']}".encode() for t in top])
    width = max(len(r) for r in rows)
    return np.array([r + [b""] * (width - len(r)) for r in rows], dtype=object)


def stackable(name: str, outputs: list[dict[str, np.ndarray]]) -> bool:
    """Whether every image's ``name`` tensor has one shape (a graph of one image per call, such
    as Faster R-CNN's, gives each image as many boxes as it found)."""
    return len({o[name].shape for o in outputs}) == 1


def raw_tensor(name: str, outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
    """A graph output for the whole request: the images' tensors (core.tasks splits them per
    image) stacked on a batch axis."""
    values = [o[name] for o in outputs]
    if not stackable(name, outputs):
        raise bad(f"output {name!r} has a different shape for each image (a graph of one image per call); "
                  "send one image per request, or ask for the task outputs")
    return np.stack(values)


def encode_response(served: ServedModel, request_id: str | None, tensors: list[tuple[Requested, np.ndarray]]
                    ) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length."""
    entries, blobs = [], []
    for req, arr in tensors:
        datatype = TO_V2.get(arr.dtype.name, "BYTES")
        entry: dict[str, Any] = {"name": req.name, "datatype": datatype, "shape": list(arr.shape)}
        if req.binary:
            blob = bytes_binary(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
        else:
            entry["data"] = arr.reshape(-1).tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": served.model.name, "model_version": served.model.version, "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def bytes_binary(arr: np.ndarray) -> bytes:
    """BYTES elements as the binary extension and gRPC's raw contents carry them: each a
    4-byte little-endian length, then its bytes."""
    parts = []
    for v in arr.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)
