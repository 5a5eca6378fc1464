"""Response shapes, for the OpenAPI document and for readers; the handlers build the same dicts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


class Label(BaseModel):
    label: str
    label_id: int
    score: float
    heatmap_png: str | None = Field(None, description="with cam=true: the label's class activation map, a base64 "
                                    "greyscale PNG at the original image size (255 = the map's maximum)")


class Detection(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in original image pixels")
    label: str
    label_id: int
    score: float


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


class SegmentBatchResponse(BaseModel):
    model: ModelRef
    timing: Timing
    results: list[SegmentResult]


RESPONSES: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {  # by endpoint
    "classify": (ClassifyResponse, ClassifyBatchResponse),
    "detect": (DetectResponse, DetectBatchResponse),
    "segment": (SegmentResponse, SegmentBatchResponse),
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
    max_batch: int = Field(description="largest batch the service forms for this model")


class ModelInfo(BaseModel):
    name: str
    version: str
    default_version: bool = Field(description="whether requests naming only the model get this version")
    task: str
    endpoint: str
    endpoints: list[str] = Field(description="every route that serves this model (e.g. /classify and /embed)")
    precision: str
    labels: list[str]
    input: ModelInput
    outputs: dict[str, str] = Field(description="optional outputs the model carries: embedding, cam")
    batch: ModelBatch
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
