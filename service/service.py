"""The BentoML service: POST an image, get labels, boxes or masks; GET /models.

Request path: read upload -> decode and resize/letterbox to the model's uint8 input
(core.imaging.load_input) -> dynamic batch (service.batching) -> ONNX Runtime ->
the task's result (core.tasks) -> JSON. Decode and postprocess run in worker threads;
inference runs in one thread per worker process. Start it with::

    bentoml serve service.service:ConvServe --port 3000
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI
from pydantic import Field
from starlette.responses import JSONResponse

from core.contract import ModelContract
from core.errors import ConfigError, ConvserveError, ImageTooLarge
from core.geometry import Geometry
from core.imaging import DecodedImage
from core.tasks import TASKS
from service.errors import ErrorEnvelopeMiddleware, client_error, error_response
from service.pipeline import preprocess
from service.metrics import ERRORS, REQUEST_SECONDS, observe_batch
from service.repository import ModelRepository, ServedModel, check_repository
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


def _import_time_settings() -> Settings | None:
    """Settings for the decorators below, which BentoML reads at import. Invalid settings are
    None here: the start-up check (ConvServe.check_start_up) reports them and stops the server."""
    try:
        return Settings.from_env()
    except ConfigError:
        return None


_SETTINGS = _import_time_settings()


ops = FastAPI(title="convserve operations", openapi_url=None, docs_url=None, redoc_url=None)


@bentoml.service(
    name="convserve",
    workers=_SETTINGS.workers if _SETTINGS else 1,
    traffic={"timeout": 120, "max_concurrency": 1024},
)
@bentoml.asgi_app(ops, path="/")
class ConvServe:
    """Classification, detection and segmentation on ONNX Runtime; see README.md."""

    @bentoml.on_deployment
    def check_start_up() -> None:
        """Runs once in ``bentoml serve``'s main process before any worker starts: a bad
        setting or a broken repository stops the server with one line naming the problem
        (workers that failed instead would be restarted forever)."""
        _setup_logging()
        try:
            check_repository(Settings.from_env())
        except ConvserveError as exc:
            raise SystemExit(f"convserve: cannot start: {exc}") from None

    def __init__(self) -> None:
        _setup_logging()
        self.settings = Settings.from_env()
        self.repo = ModelRepository(self.settings, on_batch=observe_batch)
        self.repo.warm_up()
        log.info("ready: %d model(s) loaded and warmed up", sum(len(v) for v in self.repo.models.values()))

    def __is_ready__(self) -> bool:
        return self.repo.ready

    @ops.get("/models")
    def list_models(self) -> dict[str, Any]:
        """Every loaded model: task, labels, input, version and the providers it really runs on."""
        return {"models": self.repo.describe()}

    async def _handle(self, image: Path, options: dict[str, Any], task_name: str) -> JSONResponse:
        task = TASKS[task_name]
        t0 = time.perf_counter()
        served: ServedModel | None = None
        try:
            served = self.repo.resolve(options.get("model"), task.name)
            c = served.model.contract
            decoded, arr, geo = await anyio.to_thread.run_sync(self._decode, image, c)
            t1 = time.perf_counter()
            batched = await served.batcher.submit(arr)
            t2 = time.perf_counter()
            result = await anyio.to_thread.run_sync(task.result, batched.outputs, geo, c, options)
            t3 = time.perf_counter()
        except Exception as exc:
            response = client_error(exc)
            if response is None:
                log.exception("/%s failed", task.endpoint)
                response = error_response(500, "internal", "the model failed on this input; the server log has details")
            ERRORS.labels(endpoint=task.endpoint, type=json.loads(response.body)["error"]["type"]).inc()
            return response
        REQUEST_SECONDS.labels(model=served.ref, endpoint=task.endpoint).observe(t3 - t0)
        body = {
            "model": {"name": served.model.name, "version": served.model.version},
            "image": {"width": decoded.width, "height": decoded.height, "format": decoded.format},
            "timing": {"decode_ms": round((t1 - t0) * 1e3, 3), "inference_ms": round((t2 - t1) * 1e3, 3),
                       "postprocess_ms": round((t3 - t2) * 1e3, 3), "total_ms": round((t3 - t0) * 1e3, 3),
                       "batch_size": batched.batch_size},
            **result,
        }
        return JSONResponse(body)

    def _decode(self, image: Path, c: ModelContract) -> tuple[DecodedImage, np.ndarray, Geometry]:
        try:
            size = image.stat().st_size
        except OSError:
            size = 0
        if size > self.settings.max_bytes:
            raise ImageTooLarge(f"the upload is {size} bytes; the limit is {self.settings.max_bytes}")
        return preprocess(image.read_bytes(), c, self.settings)

    @bentoml.api(route="/classify")
    async def classify(
        self,
        image: Annotated[Path, Field(description="the image file (JPEG, PNG, WebP, BMP, TIFF, GIF, ...)")],
        model: Annotated[str, Field(description="name or name:version; empty = the classification model")] = "",
        top_k: Annotated[int, Field(ge=1, le=1000, description="how many labels to return")] = 5,
    ) -> ClassifyResponse:
        """Top-k labels with softmax scores."""
        return await self._handle(image, {"model": model, "top_k": top_k}, "classification")  # type: ignore[return-value]

    @bentoml.api(route="/detect")
    async def detect(
        self,
        image: Annotated[Path, Field(description="the image file")],
        model: Annotated[str, Field(description="name or name:version; empty = the detection model")] = "",
        score_threshold: Annotated[float, Field(ge=0.0, le=1.0, description="drop detections scoring below")] = 0.3,
        max_detections: Annotated[int, Field(ge=1, le=1000, description="keep at most this many, best first")] = 100,
    ) -> DetectResponse:
        """Boxes [x1, y1, x2, y2] in original image pixels, with label and score."""
        options = {"model": model, "score_threshold": score_threshold, "max_detections": max_detections}
        return await self._handle(image, options, "detection")  # type: ignore[return-value]

    @bentoml.api(route="/segment")
    async def segment(
        self,
        image: Annotated[Path, Field(description="the image file")],
        model: Annotated[str, Field(description="name or name:version; empty = the segmentation model")] = "",
        mask_format: Annotated[Literal["rle", "polygon", "png"], Field(
            description="rle: COCO RLE per class; polygon: COCO polygons; png: one class-index PNG")] = "rle",
    ) -> SegmentResponse:
        """Per-class masks at original image size, with pixel areas and bounding boxes."""
        return await self._handle(image, {"model": model, "mask_format": mask_format}, "segmentation")  # type: ignore[return-value]


ConvServe.add_asgi_middleware(ErrorEnvelopeMiddleware,
                              max_body_bytes=(_SETTINGS.max_bytes if _SETTINGS else 32 << 20) + 1024 * 1024)
