"""Response shapes, for the OpenAPI page and for readers; the handlers build the same dicts."""

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
    decode_ms: float = Field(description="decode + resize to the model input")
    inference_ms: float = Field(description="waiting in the batch queue + ONNX Runtime")
    postprocess_ms: float
    total_ms: float
    batch_size: int = Field(description="images in the ONNX Runtime run that served this request")


class Envelope(BaseModel):
    model: ModelRef
    image: ImageInfo
    timing: Timing


class Label(BaseModel):
    label: str
    label_id: int
    score: float


class ClassifyResponse(Envelope):
    labels: list[Label]


class Detection(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in original image pixels")
    label: str
    label_id: int
    score: float


class DetectResponse(Envelope):
    detections: list[Detection]


class Segment(BaseModel):
    label: str
    label_id: int
    area: int = Field(description="pixels of this class in the original image")
    bbox: list[int] = Field(description="[x1, y1, x2, y2] enclosing the class's pixels")
    rle: dict[str, Any] | None = Field(None, description="COCO RLE {size: [h, w], counts} (mask_format=rle)")
    polygons: list[list[float]] | None = Field(None, description="COCO polygons (mask_format=polygon)")


class SegmentResponse(Envelope):
    classes: list[Segment]
    mask_png: str | None = Field(None, description="base64 class-index PNG (mask_format=png); pixel = label_id")
