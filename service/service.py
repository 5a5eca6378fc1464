"""The BentoML service: POST an image, get labels, boxes or masks; GET /models.

Request path: read upload -> decode (service.imaging) -> resize/letterbox to the model's
uint8 input (service.preprocess) -> dynamic batch (service.batching) -> ONNX Runtime ->
postprocess (service.postprocess) -> JSON. Decode and postprocess run in worker threads;
inference runs in one thread per worker process. Start it with::

    bentoml serve service.service:ConvServe --port 3000
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI
from pydantic import Field
from starlette.responses import JSONResponse

from service import postprocess
from service.contract import ModelContract
from service.errors import ErrorEnvelopeMiddleware, ImageTooLarge, ServiceError, error_response
from service.imaging import decode_image
from service.metrics import ERRORS, REQUEST_SECONDS, observe_batch
from service.preprocess import Geometry, prepare
from service.repository import ModelRepository, RepositoryError, ServedModel, preflight
from service.schemas import ClassifyResponse, DetectResponse, SegmentResponse
from service.settings import Settings

log = logging.getLogger("convserve.service")


def _setup_logging() -> None:
    """BentoML configures its own loggers only; give ours a handler so start-up facts show."""
    root = logging.getLogger("convserve")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


_setup_logging()
SETTINGS = Settings.from_env()
# Runs wherever this module is imported, including bentoml serve's main process, so a broken
# repository stops the server before any worker starts (workers would be restarted forever).
try:
    preflight(SETTINGS)
except RepositoryError as _exc:
    raise SystemExit(f"convserve: cannot start: {_exc}") from None

ops = FastAPI(title="convserve operations", openapi_url=None, docs_url=None, redoc_url=None)

Postprocess = Callable[[dict[str, np.ndarray], Geometry, ModelContract], dict[str, Any]]


@bentoml.service(
    name="convserve",
    workers=SETTINGS.workers,
    traffic={"timeout": 120, "max_concurrency": 1024},
)
@bentoml.asgi_app(ops, path="/")
class ConvServe:
    """Classification, detection and segmentation on ONNX Runtime; see README.md."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.repo = ModelRepository(SETTINGS, on_batch=observe_batch)
        self.repo.warm_up()
        log.info("ready: %d model(s) loaded and warmed up", sum(len(v) for v in self.repo.models.values()))

    def __is_ready__(self) -> bool:
        return self.repo.ready

    @ops.get("/models")
    def list_models(self) -> dict[str, Any]:
        """Every loaded model: task, labels, input, version and the providers it really runs on."""
        return {"models": self.repo.describe()}

    async def _handle(self, endpoint: str, task: str, image: Path, model: str, post: Postprocess,
                      post_in_thread: bool = False) -> JSONResponse:
        t0 = time.perf_counter()
        served: ServedModel | None = None
        try:
            served = self.repo.resolve(model, task)
            c = served.model.contract
            decoded, arr, geo = await anyio.to_thread.run_sync(self._decode, image, c)
            t1 = time.perf_counter()
            outputs = await served.batcher.submit(arr)
            t2 = time.perf_counter()
            if post_in_thread:
                result = await anyio.to_thread.run_sync(post, outputs, geo, c)
            else:
                result = post(outputs, geo, c)
            t3 = time.perf_counter()
        except ServiceError as exc:
            ERRORS.labels(endpoint=endpoint, type=exc.type).inc()
            return exc.response()
        except Exception:
            log.exception("%s failed", endpoint)
            ERRORS.labels(endpoint=endpoint, type="internal").inc()
            return error_response(500, "internal", "the model failed on this input; the server log has details")
        REQUEST_SECONDS.labels(model=served.ref, endpoint=endpoint).observe(t3 - t0)
        body = {
            "model": {"name": served.model.name, "version": served.model.version},
            "image": {"width": decoded.width, "height": decoded.height, "format": decoded.format},
            "timing": {"decode_ms": round((t1 - t0) * 1e3, 3), "inference_ms": round((t2 - t1) * 1e3, 3),
                       "postprocess_ms": round((t3 - t2) * 1e3, 3), "total_ms": round((t3 - t0) * 1e3, 3),
                       "batch_size": int(outputs.pop("__batch_size__", 1))},
            **result,
        }
        return JSONResponse(body)

    def _decode(self, image: Path, c: ModelContract) -> tuple[Any, np.ndarray, Geometry]:
        try:
            size = image.stat().st_size
        except OSError:
            size = 0
        if size > self.settings.max_bytes:
            raise ImageTooLarge(f"the upload is {size} bytes; the limit is {self.settings.max_bytes}")
        decoded = decode_image(image.read_bytes(), max_bytes=self.settings.max_bytes,
                               max_pixels=self.settings.max_pixels,
                               draft_to=max(c.input.width, c.input.height))
        arr, geo = prepare(decoded.image, c.input.width, c.input.height, c.input.resize, c.input.pad_value,
                           orig_size=(decoded.width, decoded.height))
        return decoded, arr, geo

    @bentoml.api(route="/classify")
    async def classify(
        self,
        image: Annotated[Path, Field(description="the image file (JPEG, PNG, WebP, BMP, TIFF, GIF, ...)")],
        model: Annotated[str, Field(description="name or name:version; empty = the classification model")] = "",
        top_k: Annotated[int, Field(ge=1, le=1000, description="how many labels to return")] = 5,
    ) -> ClassifyResponse:
        """Top-k labels with softmax scores."""
        def post(out: dict[str, np.ndarray], geo: Geometry, c: ModelContract) -> dict[str, Any]:
            return {"labels": postprocess.top_k(out[c.outputs.scores], c.outputs.kind, c.labels, top_k)}

        return await self._handle("classify", "classification", image, model, post)  # type: ignore[return-value]

    @bentoml.api(route="/detect")
    async def detect(
        self,
        image: Annotated[Path, Field(description="the image file")],
        model: Annotated[str, Field(description="name or name:version; empty = the detection model")] = "",
        score_threshold: Annotated[float, Field(ge=0.0, le=1.0, description="drop detections scoring below")] = 0.3,
        max_detections: Annotated[int, Field(ge=1, le=1000, description="keep at most this many, best first")] = 100,
    ) -> DetectResponse:
        """Boxes [x1, y1, x2, y2] in original image pixels, with label and score."""
        def post(out: dict[str, np.ndarray], geo: Geometry, c: ModelContract) -> dict[str, Any]:
            o = c.outputs
            return {"detections": postprocess.detections(out[o.boxes], out[o.scores], out[o.labels], geo,
                                                         c.labels, score_threshold, max_detections)}

        return await self._handle("detect", "detection", image, model, post)  # type: ignore[return-value]

    @bentoml.api(route="/segment")
    async def segment(
        self,
        image: Annotated[Path, Field(description="the image file")],
        model: Annotated[str, Field(description="name or name:version; empty = the segmentation model")] = "",
        mask_format: Annotated[Literal["rle", "polygon", "png"], Field(
            description="rle: COCO RLE per class; polygon: COCO polygons; png: one class-index PNG")] = "rle",
    ) -> SegmentResponse:
        """Per-class masks at original image size, with pixel areas and bounding boxes."""
        def post(out: dict[str, np.ndarray], geo: Geometry, c: ModelContract) -> dict[str, Any]:
            cmap = postprocess.class_map(out[c.outputs.masks], c.outputs.kind, geo)
            return postprocess.segments(cmap, c.labels, mask_format)

        return await self._handle("segment", "segmentation", image, model, post, post_in_thread=True)  # type: ignore[return-value]


ConvServe.add_asgi_middleware(ErrorEnvelopeMiddleware, max_body_bytes=SETTINGS.max_bytes + 1024 * 1024)
