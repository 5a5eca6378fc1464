"""One worker's request path once the body is read, without any HTTP: options, model,
decode, batch, result.

Decoding and heavy post-processing run in a pool of CONVSERVE_DECODE_THREADS threads, so
the pixels being decoded at once are bounded and the event loop stays free for HTTP; ONNX
Runtime runs on the repository's CONVSERVE_INFERENCE_THREADS threads, fed by the per-model
batchers; a one-image request that finds its model idle is decoded and run in one decode
thread instead, with no queue (DynamicBatcher.claim_idle_run).
:func:`preprocess` is the service's whole image preparation: core.imaging.load_input under
the service's limits, the same function the training loaders call.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from core.contract import ModelContract
from core.errors import ImageTooLarge, InvalidImage
from core.geometry import Geometry
from core.imaging import DecodedImage, load_input
from core.tasks import Task
from service.batching import BatchResult
from service.repository import ModelRepository, ServedModel
from service.settings import Settings
from service.uploads import Upload

ImageInfo = dict[str, Any]  # width, height (after EXIF orientation) and format of an upload
Prepared = tuple[ImageInfo, np.ndarray, Geometry]


def preprocess(data: bytes, contract: ModelContract, settings: Settings) -> Prepared:
    """Decode ``data`` and resize it to ``contract``'s input; InvalidImage / ImageTooLarge.
    Only the model input and the upload's size travel on: the decoded image is dropped here,
    so the pixels a worker holds are those of the decodes in progress."""
    decoded, arr, geometry = load_input(data, contract.input, max_bytes=settings.max_bytes,
                                        max_pixels=settings.max_pixels)
    return _info(decoded), arr, geometry


def _info(decoded: DecodedImage) -> ImageInfo:
    return {"width": decoded.width, "height": decoded.height, "format": decoded.format}


class Pipeline:
    """Answers parsed requests: :meth:`answer` returns the JSON-ready body and the model used."""

    def __init__(self, repo: ModelRepository, settings: Settings) -> None:
        self.repo, self.settings = repo, settings
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    async def answer(self, task: Task, upload: Upload) -> tuple[dict[str, Any], ServedModel]:
        """Raises InvalidOption, ModelNotFound, WrongTask, InvalidImage, ImageTooLarge,
        Overloaded (a full model queue) or, for a failed model, anything else."""
        t0 = time.perf_counter()
        options = task.parse_options(upload.options)
        served = self.repo.resolve(options["model"], task.name)
        c = served.model.contract
        loop = asyncio.get_running_loop()
        if len(upload.images) == 1 and served.batcher.claim_idle_run():
            # Low load: the model is idle, so decode and run it in one thread, with no queue.
            ran: float | None = None
            try:
                prepared, batched, t1, ran = await loop.run_in_executor(
                    self.pool, _decode_and_run, upload.images[0], served, self.settings)
            finally:
                served.batcher.release_run(1, ran)
            t2 = time.perf_counter()
        else:
            prepared = await self._each(
                [loop.run_in_executor(self.pool, preprocess, data, c, self.settings) for data in upload.images])
            t1 = time.perf_counter()
            batched = await self._each([served.batcher.submit(arr) for _, arr, _ in prepared])
            t2 = time.perf_counter()
        geometries = [geo for _, _, geo in prepared]
        if task.result_in_thread:
            results = await loop.run_in_executor(self.pool, _results, task, batched, geometries, c, options)
        else:
            results = _results(task, batched, geometries, c, options)
        t3 = time.perf_counter()
        timing = {"decode_ms": round((t1 - t0) * 1e3, 3), "inference_ms": round((t2 - t1) * 1e3, 3),
                  "postprocess_ms": round((t3 - t2) * 1e3, 3), "total_ms": round((t3 - t0) * 1e3, 3),
                  "batch_size": max(b.batch_size for b in batched)}
        images = [info for info, _, _ in prepared]
        body: dict[str, Any] = {"model": {"name": served.model.name, "version": served.model.version}}
        if len(results) == 1:
            body.update(image=images[0], timing=timing, **results[0])
        else:
            body.update(timing=timing, results=[{"image": im, **r} for im, r in zip(images, results)])
        return body, served

    @staticmethod
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
    """One image, decoded and run in this thread: its preparation, outputs, and the seconds
    ONNX Runtime took."""
    prepared = preprocess(data, served.model.contract, settings)
    start = time.perf_counter()
    (outputs,) = served.model.infer(prepared[1][None])
    ran = time.perf_counter() - start
    return [prepared], [BatchResult(outputs, 1)], start, ran


def _results(task: Task, batched: list[BatchResult], geometries: list[Geometry], contract: ModelContract,
             options: dict[str, Any]) -> list[dict[str, Any]]:
    return [task.result(b.outputs, geo, contract, options) for b, geo in zip(batched, geometries)]
