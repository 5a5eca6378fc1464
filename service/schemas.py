"""The OpenAPI description of convserve's routes: response shapes (pydantic models, for the
document and for readers; the handlers build the same dicts, and a test validates real
answers against them), request bodies and options, and the error statuses each route
really returns. BentoML merges it into /docs.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from service.endpoints import VIDEO_OPTIONS, Option

if TYPE_CHECKING:
    from service.endpoints import Endpoint


class ModelRef(BaseModel):
    name: str
    version: str


class ImageInfo(BaseModel):
    width: int = Field(description="width after EXIF orientation")
    height: int = Field(description="height after EXIF orientation")
    format: str | None = Field(None, description="container format Pillow identified (JPEG, PNG, ...)")


class Timing(BaseModel):
    decode_ms: float = Field(description="decode + resize to the model input (all images of the request)")
    inference_ms: float = Field(description="waiting in the batch queue + ONNX Runtime")
    postprocess_ms: float
    total_ms: float
    batch_size: int = Field(description="images in the (largest) ONNX Runtime run that served this request")
    threads: int = Field(description="ONNX Runtime intra-op threads of that run: every core for a lone image of "
                                     "a model that gains from them (README \"Heavy models\")")


class Label(BaseModel):
    label: str
    label_id: int
    score: float
    heatmap_png: str | None = Field(None, description="with cam=true: the label's class activation map, a base64 "
                                    "greyscale PNG at the original image size, scaled down to at most 1024 px "
                                    "on the long side (255 = the map's maximum)")


class Detection(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in original image pixels")
    label: str
    label_id: int
    score: float


class Instance(Detection):
    area: int = Field(description="the object's pixels in the original image")
    rle: dict[str, Any] | None = Field(None, description="COCO RLE {size: [h, w], counts} of the object's mask at "
                                       "the original image size (mask_format=rle)")
    polygons: list[list[float]] | None = Field(None, description="COCO polygons in original pixels "
                                               "(mask_format=polygon)")
    mask_png: str | None = Field(None, description="base64 PNG of the mask inside mask_box, 255 = the object "
                                 "(mask_format=png)")
    mask_box: list[int] | None = Field(None, description="[x1, y1, x2, y2]: the window mask_png covers")


class Keypoint(BaseModel):
    name: str = Field(description="the keypoint's name (the model's keypoints.names, in that order)")
    x: float = Field(description="original image pixels")
    y: float = Field(description="original image pixels")
    score: float = Field(description="confidence that the keypoint is visible there, 0..1")


class PoseDetection(Detection):
    keypoints: list[Keypoint] = Field(description="one per keypoint of the model's skeleton, in its order; COCO "
                                      "results: keypoints [x, y, score, ...] with the object's score")


class Segment(BaseModel):
    label: str
    label_id: int
    area: int = Field(description="pixels of this class in the original image")
    bbox: list[int] = Field(description="[x1, y1, x2, y2] enclosing the class's pixels")
    rle: dict[str, Any] | None = Field(None, description="COCO RLE {size: [h, w], counts} (mask_format=rle)")
    polygons: list[list[float]] | None = Field(None, description="COCO polygons (mask_format=polygon)")


class ClassifyResult(BaseModel):
    image: ImageInfo
    labels: list[Label]


class DetectResult(BaseModel):
    image: ImageInfo
    detections: list[Detection]


class InstancesResult(BaseModel):
    image: ImageInfo
    detections: list[Instance]


class KeypointsResult(BaseModel):
    image: ImageInfo
    detections: list[PoseDetection]


class SegmentResult(BaseModel):
    image: ImageInfo
    classes: list[Segment]
    mask_png: str | None = Field(None, description="base64 class-index PNG (mask_format=png); pixel = label_id")


class EmbedResult(BaseModel):
    image: ImageInfo
    embedding: list[float] = Field(description="L2-normalised: the cosine similarity of two images is the dot product")
    dimensions: int


class EmbedResponse(EmbedResult):
    model: ModelRef
    timing: Timing


class EmbedBatchResponse(BaseModel):
    model: ModelRef
    timing: Timing
    results: list[EmbedResult]


class ClassifyResponse(ClassifyResult):
    """One image: its result with the model and timing."""

    model: ModelRef
    timing: Timing


class DetectResponse(DetectResult):
    model: ModelRef
    timing: Timing


class InstancesResponse(InstancesResult):
    model: ModelRef
    timing: Timing


class KeypointsResponse(KeypointsResult):
    model: ModelRef
    timing: Timing


class SegmentResponse(SegmentResult):
    model: ModelRef
    timing: Timing


class ClassifyBatchResponse(BaseModel):
    """Several ``image`` parts: one result per image, in the order sent."""

    model: ModelRef
    timing: Timing
    results: list[ClassifyResult]


class DetectBatchResponse(BaseModel):
    model: ModelRef
    timing: Timing
    results: list[DetectResult]


class InstancesBatchResponse(BaseModel):
    model: ModelRef
    timing: Timing
    results: list[InstancesResult]


class KeypointsBatchResponse(BaseModel):
    model: ModelRef
    timing: Timing
    results: list[KeypointsResult]


class SegmentBatchResponse(BaseModel):
    model: ModelRef
    timing: Timing
    results: list[SegmentResult]


RESPONSES: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {  # by endpoint
    "classify": (ClassifyResponse, ClassifyBatchResponse),
    "detect": (DetectResponse, DetectBatchResponse),
    "segment": (SegmentResponse, SegmentBatchResponse),
    "keypoints": (KeypointsResponse, KeypointsBatchResponse),
    "instances": (InstancesResponse, InstancesBatchResponse),
    "embed": (EmbedResponse, EmbedBatchResponse),
}


class ModelInput(BaseModel):
    height: int
    width: int
    channels: int = Field(description="3 (RGB) or 1 (greyscale: uploads are converted)")
    color: str
    resize: str = Field(description="stretch or letterbox")
    dtype: str
    layout: str


class ModelBatch(BaseModel):
    dynamic: bool
    size: int | None
    max_batch: int = Field(description="largest batch the service forms for this model (CONVSERVE_MAX_BATCH)")
    target_ms: float | None = Field(description="time a batch may take (CONVSERVE_BATCH_TARGET_MS, or four "
                                                "one-image runs, at least 25 ms)")
    limit_now: int = Field(description="largest batch expected to finish within the target, from the costs "
                                       "measured so far")


class ModelPlacement(BaseModel):
    mode: str = Field(description="narrow (one thread a run, a run per core), wide (one run on every core) or "
                                  "both (a lone image on every core, batches narrow); README \"Heavy models\"")
    batch_threads: int = Field(description="ONNX Runtime intra-op threads of a batch")
    lone_threads: int = Field(description="intra-op threads of a lone image on an idle worker")
    runs: int = Field(description="batches of this model in flight at once")
    reason: str = Field(description="what was measured, or the setting that chose it")


class KeypointSchema(BaseModel):
    names: list[str] = Field(description="the keypoints, in the order every answer lists them")
    skeleton: list[list[int]] = Field(description="edges to draw: pairs of 0-based indices into names")
    sigmas: list[float] = Field(description="COCO OKS sigma per keypoint (pycocotools' kpt_oks_sigmas)")


class EmbeddingSchema(BaseModel):
    dimension: int = Field(description="the length of each embedding")
    metric: str = Field(description="how embeddings compare: cosine (unit vectors, so the dot product)")


class ModelInfo(BaseModel):
    name: str
    version: str
    default_version: bool = Field(description="whether requests naming only the model get this version")
    task: str
    endpoint: str
    endpoints: list[str] = Field(description="every route that serves this model (e.g. /classify and /embed)")
    precision: str
    labels: list[str] = Field(description="class names (empty for an embedding model)")
    input: ModelInput
    outputs: dict[str, str] = Field(description="optional outputs the model carries: embedding, cam")
    keypoints: KeypointSchema | None = Field(None, description="keypoint models: what their keypoints are")
    embedding: EmbeddingSchema | None = Field(None, description="embedding models: their vectors' dimension and "
                                              "metric (galleries are bound to one model version)")
    batch: ModelBatch
    placement: ModelPlacement
    providers: list[str] = Field(description="the ONNX Runtime execution providers it really runs on")
    provenance: dict[str, Any]


class RefusedModel(BaseModel):
    path: str
    error: str


class ModelList(BaseModel):
    models: list[ModelInfo]
    errors: list[RefusedModel] = Field(description="files a reload refused (the versions before keep serving)")


class ReloadAnswer(BaseModel):
    added: list[str]
    replaced: list[str]
    removed: list[str]
    refused: dict[str, str]
    models: list[str]
    errors: list[RefusedModel]


# --- the Open Inference Protocol v2 -------------------------------------------------------------

class V2Error(BaseModel):
    error: str


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension that varies (the batch)")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] = {}


class V2InferInput(BaseModel):
    name: str = Field(description="the model's input name (see its metadata)")
    datatype: str = Field(description="BYTES: encoded images, shape [N]; UINT8: the model's own tensor [N, H, W, C]")
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the input's bytes after the JSON")
    data: list[Any] | None = Field(None, description="JSON data: base64 strings (BYTES) or integers (UINT8)")


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data (bool); classification (k, on the scores "
                                              "output)")


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="binary_data_output; task options (score_threshold, "
                                              "max_detections)")
    inputs: list[V2InferInput]
    outputs: list[V2RequestedOutput] | None = Field(None, description="default: every output")


class V2InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the data follows the JSON")
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2InferOutput]


class V2RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY or UNAVAILABLE")
    reason: str


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable error type, e.g. invalid_image, payload_too_large, overloaded")
    message: str = Field(description="what is wrong, for a person")
    detail: Any | None = None


class ErrorBody(BaseModel):
    """Every error the service returns has this shape."""

    error: ErrorDetail


# --- requests and errors in the OpenAPI document -------------------------------------------------

ERRORS = {
    400: "malformed request (multipart syntax, Content-Length mismatch) or an image Pillow cannot decode",
    401: "API keys are on (CONVSERVE_API_KEYS) and the request has no valid one",
    404: "no such model or version",
    408: "the request body did not arrive in time (CONVSERVE_BODY_TIMEOUT_S)",
    413: "body over CONVSERVE_MAX_BYTES, image over CONVSERVE_MAX_PIXELS, or more images than CONVSERVE_MAX_IMAGES",
    415: "a Content-Type other than multipart/form-data, image/* or application/octet-stream, or a Content-Encoding",
    422: "an option out of range or unknown, a missing 'image', "
         "a model of another task or without the output asked for",
    500: "the model failed on this input (the server log has details)",
    503: "this worker holds as much as it may, or is shutting down; retry after Retry-After seconds",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "model": ErrorBody} for status, text in ERRORS.items()}
V2_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"description": d, "model": V2Error} for s, d in (
        (400, "a malformed request: wrong datatype or shape, a BYTES element that is not an image, an unknown output"),
        (401, ERRORS[401]), (404, "no such model or version"), (413, ERRORS[413]),
        (503, ERRORS[503]))}
RENDER_OPTION = {"type": "string", "enum": ["png", "jpeg", "true", "false"], "default": "false",
                 "description": "answer with the original image annotated (boxes, masks, labels) as PNG or JPEG "
                                "instead of JSON; so does an Accept: image/png or image/jpeg header"}
IMAGE_FIELD_DOC = "the image; repeat the field to send several, answered in order"
RAW_BODY = {"schema": {"type": "string", "format": "binary"}}
VIDEO_DOC = ("a video (MP4 or WebM), answered as application/x-ndjson: one JSON line per sampled frame "
             "(frame, time_s and the endpoint's result), then a summary line {\"done\": true, ...} or an error line")
VIDEO_BODY = {"schema": {"type": "string", "format": "binary", "description": VIDEO_DOC}}


def endpoint_request(endpoint: Endpoint, image_field: str, raw_types: tuple[str, ...], video_field: str,
                     video_types: tuple[str, ...]) -> dict[str, Any]:
    """The requestBody and query parameters of an endpoint's route: the image (or a video) as a
    multipart field or the whole body; the options as query parameters or (multipart) form fields."""
    options = {o.name: o.json_schema() for o in (*endpoint.options, *VIDEO_OPTIONS)}
    if endpoint.drawable:
        options["render"] = RENDER_OPTION
    image = {"type": "string", "format": "binary", "description": "an image file (JPEG, PNG, WebP, BMP, TIFF, GIF)"}
    form = {"type": "object", "anyOf": [{"required": [image_field]}, {"required": [video_field]}], "properties": {
        image_field: {"oneOf": [image, {"type": "array", "items": image}], "description": IMAGE_FIELD_DOC},
        video_field: {**VIDEO_BODY["schema"], "description": f"instead of {image_field}: {VIDEO_DOC}"},
        **options}}
    return {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": form}, "image/*": RAW_BODY, **{t: RAW_BODY for t in raw_types},
            **{t: VIDEO_BODY for t in video_types}}},
        "parameters": [{"name": name, "in": "query", "required": False, "schema": schema,
                        "description": f"{schema['description']} (with multipart, a form field of the same name "
                                       "works too; not both)"} for name, schema in options.items()],
    }


def path_parameters(path: str, described: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The ``{name}`` parameters of a raw route's path, for the document (FastAPI finds them
    only in an endpoint function's signature); ``described``: their descriptions (the
    model's name and version by default)."""
    names = [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]
    described = described or {"name": "the model's name", "version": "the model's version"}
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"},
             "description": described.get(n, n)} for n in names]


# --- galleries (service.galleries) ------------------------------------------------------------

class GalleryInfo(BaseModel):
    name: str
    model: ModelRef = Field(description="the model version whose embeddings the gallery holds; it refuses any other")
    dimension: int
    metric: str = Field(description="cosine: scores are cosine similarities (-1..1)")
    count: int = Field(description="items in the gallery")
    created_at: float = Field(description="Unix time")


class GalleryList(BaseModel):
    galleries: list[GalleryInfo]


class GalleryCreate(BaseModel):
    name: str = Field(description="1-128 characters: letters, digits, '.', '_' and '-', starting with a letter or "
                                  "digit; unique")
    model: str = Field("", description="a model /embed serves, name or name:version; empty: /embed's default")


class GalleryDeleted(BaseModel):
    deleted: str


class GalleryTiming(Timing):
    store_ms: float | None = Field(None, description="adding: writing the item durably")
    search_ms: float | None = Field(None, description="searching: finding the nearest items")


class ItemAdded(BaseModel):
    gallery: str
    id: str = Field(description="the item's id (given, or a random UUID)")
    count: int = Field(description="items in the gallery now")
    model: ModelRef
    timing: GalleryTiming


class GalleryItem(BaseModel):
    id: str
    metadata: dict[str, Any]
    added_at: float = Field(description="Unix time")


class ItemList(BaseModel):
    gallery: str
    count: int
    offset: int
    limit: int
    items: list[GalleryItem] = Field(description="in the order they were added")


class ItemRemoved(BaseModel):
    gallery: str
    removed: str


class Match(BaseModel):
    id: str
    score: float = Field(description="cosine similarity to the query image (1: the same embedding)")
    metadata: dict[str, Any]


class SearchAnswer(BaseModel):
    gallery: str
    model: ModelRef
    matches: list[Match] = Field(description="the k nearest items at or above the threshold, best first")
    timing: GalleryTiming


GALLERY_ERRORS: dict[int | str, dict[str, Any]] = {
    **{s: ERROR_RESPONSES[s] for s in (400, 401, 408, 413, 415)},
    503: {"description": f"{ERRORS[503]}; or galleries_unavailable: galleries are off on this deployment "
                         "(CONVSERVE_GALLERY_URL=off) or their store cannot be opened", "model": ErrorBody},
    404: {"description": "no such gallery, or no such item", "model": ErrorBody},
    409: {"description": "the gallery exists already, or holds another model version's vectors (or that version is "
                         "no longer loaded), or the galleries are full (CONVSERVE_GALLERY_MAX_ITEMS)",
          "model": ErrorBody},
    422: {"description": "a bad name, id, metadata, k or threshold, an unknown option, not exactly one image, or a "
                         "model /embed does not serve", "model": ErrorBody},
}


def query_parameters(options: tuple[Option, ...]) -> list[dict[str, Any]]:
    """``options`` as OpenAPI query parameters."""
    return [{"name": o.name, "in": "query", "required": False, "schema": o.json_schema(),
             "description": o.description} for o in options]


def image_request(options: tuple[Option, ...], image_field: str, raw_types: tuple[str, ...]) -> dict[str, Any]:
    """The requestBody and query parameters of a route that takes one image and ``options``."""
    image = {"type": "string", "format": "binary", "description": "an image file (JPEG, PNG, WebP, BMP, TIFF, GIF)"}
    form = {"type": "object", "required": [image_field],
            "properties": {image_field: image, **{o.name: o.json_schema() for o in options}}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form}, "image/*": RAW_BODY, **{t: RAW_BODY for t in raw_types}}},
        "parameters": query_parameters(options)}
