"""One worker's request path once the body is read, without any HTTP: options, model,
decode, batch, result.

Decoding and heavy post-processing run in a pool of CONVSERVE_DECODE_THREADS threads, so
the pixels being decoded at once are bounded and the event loop stays free for HTTP; ONNX
Runtime runs on the repository's CONVSERVE_INFERENCE_THREADS threads, fed by the per-model
batchers; a one-image request that finds its model idle is decoded and run in one decode
thread instead, with no queue (DynamicBatcher.claim_idle_run).

:meth:`Pipeline.run` (encoded images) and :meth:`Pipeline.run_arrays` (model-ready uint8
tensors, from the v2 protocol) give the raw outputs of each image with its geometry; the
task endpoints (:meth:`Pipeline.answer`), annotated images (:meth:`Pipeline.render`) and
the v2 protocol (service.v2) format those. :func:`preprocess` is the service's whole image
preparation: core.imaging.load_input under the service's limits, the same function the
training loaders call.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.contract import ModelContract
from core.errors import ImageTooLarge, InvalidImage, InvalidOption
from core.geometry import Geometry
from core.imaging import DecodedImage, load_image, load_input
from core.tasks import Outputs, Task
from service import metrics, render, tracing
from service.batching import BatchResult
from service.repository import ModelRepository, ServedModel
from service.settings import Settings
from service.uploads import Upload

ImageInfo = dict[str, Any]  # width, height (after EXIF orientation) and format of an upload


@dataclass(frozen=True)
class Prepared:
    """One image ready for the model: what the client sent, the model input, the mapping back."""

    info: ImageInfo
    array: np.ndarray
    geometry: Geometry


@dataclass
class Ran:
    """A request's images after inference: per image its preparation and outputs."""

    served: ServedModel
    prepared: list[Prepared]
    outputs: list[Outputs]
    batch_size: int
    started: float   # perf_counter stamps: request start, decode done, inference done
    decoded: float
    inferred: float


def preprocess(data: bytes, contract: ModelContract, settings: Settings) -> Prepared:
    """Decode ``data`` and resize it to ``contract``'s input; InvalidImage / ImageTooLarge.
    Only the model input and the upload's size travel on: the decoded image is dropped here,
    so the pixels a worker holds are those of the decodes in progress."""
    decoded, arr, geometry = load_input(data, contract.input, max_bytes=settings.max_bytes,
                                        max_pixels=settings.max_pixels)
    return Prepared(_info(decoded), arr, geometry)


def _info(decoded: DecodedImage) -> ImageInfo:
    return {"width": decoded.width, "height": decoded.height, "format": decoded.format}


class Pipeline:
    """Answers parsed requests; see the module docstring."""

    def __init__(self, repo: ModelRepository, settings: Settings) -> None:
        self.repo, self.settings = repo, settings
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    # --- decode and infer ---------------------------------------------------------------

    async def run(self, served: ServedModel, images: list[bytes]) -> Ran:
        """Decode ``images`` for ``served``'s model and run them through its batcher."""
        t0 = time.perf_counter()
        c = served.model.contract
        loop = asyncio.get_running_loop()
        if len(images) == 1 and served.batcher.claim_idle_run():
            # Low load: the model is idle, so decode and run it in one thread, with no queue.
            ran: float | None = None
            try:
                prepared, batched, t1, ran = await loop.run_in_executor(
                    self.pool, _decode_and_run, images[0], served, self.settings)
            finally:
                served.batcher.release_run(1, ran)
            tracing.interval("decode", t0, t1, images=1)
        else:
            with tracing.span("decode", images=len(images)):
                prepared = await _each([loop.run_in_executor(self.pool, preprocess, data, c, self.settings)
                                        for data in images])
            t1 = time.perf_counter()
            batched = await _each([served.batcher.submit(p.array) for p in prepared])
        t2 = time.perf_counter()
        _observe(served, batched, t1, t2)
        return Ran(served, prepared, [b.outputs for b in batched], max(b.batch_size for b in batched), t0, t1, t2)

    async def run_arrays(self, served: ServedModel, arrays: np.ndarray) -> Ran:
        """Run model-ready uint8 [N, H, W, C] images (their geometry is the identity)."""
        t0 = time.perf_counter()
        h, w = arrays.shape[1:3]
        geometry = Geometry(w, h, 1.0, 1.0, w, h)
        prepared = [Prepared({"width": w, "height": h, "format": None}, a, geometry) for a in arrays]
        batched = await _each([served.batcher.submit(a) for a in arrays])
        t2 = time.perf_counter()
        _observe(served, batched, t0, t2)
        return Ran(served, prepared, [b.outputs for b in batched], max(b.batch_size for b in batched), t0, t0, t2)

    async def results(self, task: Task, ran: Ran, options: dict[str, Any]) -> list[dict[str, Any]]:
        """The task's JSON-ready result for every image (off the loop when it is heavy)."""
        args = (task, ran.outputs, [p.geometry for p in ran.prepared], ran.served.model.contract, options)
        with tracing.span("postprocess"):
            return await self.in_pool(_results, *args) if task.heavy_result(options) else _results(*args)

    async def in_pool(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the decode pool (work that takes milliseconds, off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def resolve(self, task: Task, raw_options: dict[str, str]) -> tuple[dict[str, Any], ServedModel]:
        """Typed options and the model they name; InvalidOption / ModelNotFound / WrongTask."""
        options = task.parse_options(raw_options)
        served = self.repo.resolve(options["model"], task)
        task.check_request(served.model.contract, options)
        return options, served

    # --- the task endpoints ---------------------------------------------------------------

    async def answer(self, task: Task, upload: Upload) -> tuple[dict[str, Any], ServedModel]:
        """The JSON answer of a task endpoint. Raises InvalidOption, ModelNotFound, WrongTask,
        InvalidImage, ImageTooLarge, Overloaded (a full model queue) or, for a failed model,
        anything else."""
        options, served = self.resolve(task, upload.options)
        ran = await self.run(served, upload.images)
        results = await self.results(task, ran, options)
        t3 = time.perf_counter()
        timing = {"decode_ms": round((ran.decoded - ran.started) * 1e3, 3),
                  "inference_ms": round((ran.inferred - ran.decoded) * 1e3, 3),
                  "postprocess_ms": round((t3 - ran.inferred) * 1e3, 3),
                  "total_ms": round((t3 - ran.started) * 1e3, 3), "batch_size": ran.batch_size}
        images = [p.info for p in ran.prepared]
        body: dict[str, Any] = {"model": {"name": served.model.name, "version": served.model.version}}
        if len(results) == 1:
            body.update(image=images[0], timing=timing, **results[0])
        else:
            body.update(timing=timing, results=[{"image": im, **r} for im, r in zip(images, results)])
        return body, served

    async def render(self, task: Task, upload: Upload, fmt: str) -> tuple[bytes, ServedModel, float]:
        """The task's answer drawn on the original image, encoded as ``fmt`` (png or jpeg);
        returns (encoded image, model, seconds)."""
        if len(upload.images) != 1:
            raise InvalidOption("render", f"an annotated image answers one image; this request has {len(upload.images)}")
        options, served = self.resolve(task, upload.options)
        ran = await self.run(served, upload.images)
        results = await self.results(task, ran, options)
        with tracing.span("render"):
            data = await self.in_pool(_render, upload.images[0], task, results[0], served.model.contract, fmt,
                                      self.settings)
        return data, served, time.perf_counter() - ran.started


def _observe(served: ServedModel, batched: list[BatchResult], submitted: float, done: float) -> None:
    """Each image's queue wait into the histogram, and the request's queue/inference spans."""
    for b in batched:
        metrics.queue_wait(served.ref, b.queue_wait)
    tracing.batch_spans(batched, submitted, done)


async def _each(awaitables: list[Any]) -> list[Any]:
    """Await all; the first failure is raised, naming the image when there are several."""
    if len(awaitables) == 1:
        return [await awaitables[0]]
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, (InvalidImage, ImageTooLarge)):
            raise type(r)(f"image {i + 1} of {len(results)}: {r}")
        if isinstance(r, BaseException):
            raise r
    return results


def _decode_and_run(data: bytes, served: ServedModel, settings: Settings
                    ) -> tuple[list[Prepared], list[BatchResult], float, float]:
    """One image, decoded and run in this thread: its preparation, outputs, when the run
    started and the seconds ONNX Runtime took."""
    prepared = preprocess(data, served.model.contract, settings)
    start = time.perf_counter()
    (outputs,) = served.model.infer(prepared.array[None])
    ran = time.perf_counter() - start
    return [prepared], [BatchResult(outputs, 1, start, start)], start, ran


def _results(task: Task, outputs: list[Outputs], geometries: list[Geometry], contract: ModelContract,
             options: dict[str, Any]) -> list[dict[str, Any]]:
    return [task.result(out, geo, contract, options) for out, geo in zip(outputs, geometries)]


def _render(data: bytes, task: Task, result: dict[str, Any], contract: ModelContract, fmt: str,
            settings: Settings) -> bytes:
    """Decode the upload at full size (no draft, RGB) and draw ``result`` on it."""
    image = load_image(data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels).image
    return render.encode(render.annotate(image, task.name, result, contract.labels), fmt)
