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


RESPONSES: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "classification": (ClassifyResponse, ClassifyBatchResponse),
    "detection": (DetectResponse, DetectBatchResponse),
    "segmentation": (SegmentResponse, SegmentBatchResponse),
}


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable error type, e.g. invalid_image, payload_too_large, overloaded")
    message: str = Field(description="what is wrong, for a person")
    detail: Any | None = None


class ErrorBody(BaseModel):
    """Every error the service returns has this shape."""

    error: ErrorDetail
