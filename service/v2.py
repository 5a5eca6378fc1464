"""The Open Inference Protocol v2 (KServe v2, as Triton and OpenVINO Model Server speak it)
over REST, for every model of the repository: the messages, without any HTTP.

service.app routes ``/v2...`` here. Per model:

- **metadata**: the graph's input (``UINT8 [-1, H, W, C]``), its outputs by name, and the
  task results as tensors: ``detection_boxes`` FP32 [N, K, 4] (original pixels, xyxy),
  ``detection_scores`` FP32 [N, K], ``detection_classes`` INT64 [N, K], ``num_detections``
  INT32 [N]; ``class_map`` UINT8 [N, H, W] (original size; 255 pads images smaller than the
  largest of the request). Classification results come through the classification
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
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from core import postprocess
from core.tasks import TASKS, Task
from service.errors import V2Error

if TYPE_CHECKING:
    from service.repository import ServedModel

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
HEADER_LENGTH = "inference-header-content-length"

_TO_V2 = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
          "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
          "float32": "FP32", "float64": "FP64", "object": "BYTES"}
_ORT_TO_V2 = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(int8)": "INT8", "tensor(int32)": "INT32",
              "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
              "tensor(string)": "BYTES"}
# Task results as tensors: name -> (datatype, shape), for the tasks that have them.
TASK_OUTPUTS: dict[str, dict[str, tuple[str, list[int]]]] = {
    "detection": {"detection_boxes": ("FP32", [-1, -1, 4]), "detection_scores": ("FP32", [-1, -1]),
                  "detection_classes": ("INT64", [-1, -1]), "num_detections": ("INT32", [-1])},
    "segmentation": {"class_map": ("UINT8", [-1, -1, -1])},
    "classification": {},
}
CLASS_MAP_PAD = 255


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
    for name, spec in TASK_OUTPUTS[served.model.contract.task].items():
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


def _flat(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            out.extend(_flat(item))
        return out
    return [data]


def _elements(data: Any, count: int, where: str) -> list[Any]:
    items = _flat(data)
    if len(items) != count:
        raise bad(f"{where}: 'data' holds {len(items)} elements; its shape says {count}")
    return items


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


def parse_infer(body: bytes, header_length: int | None, served: ServedModel, max_images: int) -> InferRequest:
    """Parse and check an infer request for ``served``; V2Error naming the problem."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise bad(f"Inference-Header-Content-Length is {header_length}; the body has {len(body)} bytes")
        head, binary = body[:header_length], body[header_length:]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the request is not valid JSON: {exc}") from None
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
    images: list[bytes] | None = None
    arrays: np.ndarray | None = None
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise bad(f"{where}: a BYTES input of encoded images has shape [N]; got {shape}")
        count = shape[0]
        if size is not None:
            images = _parse_bytes_binary(binary, count, where)
        else:
            images = [_b64(item, f"{where} element {k}") for k, item in enumerate(_elements(tensor["data"], count, where))]
    elif datatype == "UINT8":
        want = [spec.height, spec.width, spec.channels]
        if len(shape) != 4 or shape[1:] != want:
            raise bad(f"{where}: a UINT8 input has the model's shape [N, {', '.join(map(str, want))}]; got {shape}")
        count = shape[0]
        total = int(np.prod(shape))
        if size is not None:
            if len(binary) != total:
                raise bad(f"{where}: shape {shape} needs {total} bytes of binary data; got {len(binary)}")
            arrays = np.frombuffer(binary, np.uint8).reshape(shape)
        else:
            items = _elements(tensor["data"], total, where)
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in items):
                raise bad(f"{where}: UINT8 data must be integers in 0..255")
            arrays = np.asarray(items, np.uint8).reshape(shape)
    else:
        raise bad(f"{where}: datatype {datatype!r} is not accepted: send BYTES (encoded images, shape [N]) or UINT8 "
                  f"(the model's input, shape [N, {spec.height}, {spec.width}, {spec.channels}])")
    if count < 1:
        raise bad(f"{where}: the batch is empty")
    if count > max_images:
        raise V2Error(413, f"{where}: {count} images in one request; the limit is {max_images} (CONVSERVE_MAX_IMAGES)")
    doc_params = doc.get("parameters") or {}
    if not isinstance(doc_params, dict):
        raise bad("'parameters' must be an object")
    default_binary = doc_params.get("binary_data_output") is True
    outputs = _requested(doc.get("outputs"), served, default_binary)
    task = TASKS[served.model.contract.task]
    options = {o.name: _option_text(doc_params[o.name]) for o in task.options if o.name != "model" and o.name in doc_params}
    request_id = doc.get("id")
    return InferRequest(request_id if isinstance(request_id, str) else None, images, arrays, outputs, options,
                        explicit=doc.get("outputs") is not None)


def _option_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _requested(raw: Any, served: ServedModel, default_binary: bool) -> list[Requested]:
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


# --- responses -------------------------------------------------------------------------------

def task_tensors(task: Task, names: set[str], outputs: list[dict[str, np.ndarray]], geometries: list[Any],
                 served: ServedModel, options: dict[str, Any]) -> dict[str, np.ndarray]:
    """The task results requested in ``names``, as arrays with a batch axis."""
    c = served.model.contract
    out: dict[str, np.ndarray] = {}
    if c.task == "detection" and names & set(TASK_OUTPUTS["detection"]):
        found = [task.result(o, g, c, options)["detections"] for o, g in zip(outputs, geometries)]
        k = max((len(f) for f in found), default=0)
        n = len(found)
        boxes, scores = np.zeros((n, k, 4), np.float32), np.zeros((n, k), np.float32)
        classes, count = np.zeros((n, k), np.int64), np.zeros((n,), np.int32)
        for i, dets in enumerate(found):
            count[i] = len(dets)
            for j, d in enumerate(dets):
                boxes[i, j], scores[i, j], classes[i, j] = d["box"], d["score"], d["label_id"]
        out.update(detection_boxes=boxes, detection_scores=scores, detection_classes=classes, num_detections=count)
    if c.task == "segmentation" and "class_map" in names:
        maps = [postprocess.class_map(o[c.outputs.masks], c.outputs.kind, g) for o, g in zip(outputs, geometries)]
        h, w = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
        stacked = np.full((len(maps), h, w), CLASS_MAP_PAD, np.uint8)
        for i, m in enumerate(maps):
            stacked[i, :m.shape[0], :m.shape[1]] = m
        out["class_map"] = stacked
    return {k: v for k, v in out.items() if k in names}


def response_tensors(request: InferRequest, task: Task, served: "ServedModel", outputs: list[dict[str, np.ndarray]],
                     geometries: list[Any], options: dict[str, Any]) -> list[tuple[Requested, np.ndarray]]:
    """Every requested output as an array: classification strings, task tensors or the graph's
    own; without named outputs, a graph output with no batch form (one-image graphs give each
    image as many boxes as it found) is left to the task tensors."""
    tensors = task_tensors(task, {r.name for r in request.outputs}, outputs, geometries, served, options)
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
        datatype = _TO_V2.get(arr.dtype.name, "BYTES")
        entry: dict[str, Any] = {"name": req.name, "datatype": datatype, "shape": list(arr.shape)}
        if req.binary:
            blob = _bytes_binary(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
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


def _bytes_binary(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)
