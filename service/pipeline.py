"""One worker's request path once the body is read, without any HTTP: options, model,
decode, batch, result.

Decoding and heavy post-processing run in a pool of CONVSERVE_DECODE_THREADS threads, so
the pixels being decoded at once are bounded and the event loop stays free for HTTP; ONNX
Runtime runs on the repository's CONVSERVE_INFERENCE_THREADS threads, fed by the per-model
batchers; a one-image request that finds its model idle is decoded and run in one decode
thread instead, with no queue (DynamicBatcher.claim_idle_run).

:meth:`Pipeline.run` (encoded images) and :meth:`Pipeline.run_arrays` (model-ready uint8
tensors, from the v2 protocol) give the raw outputs of each image with its geometry (an
:class:`Inferred`); the endpoints (:meth:`Pipeline.answer`), annotated images
(:meth:`Pipeline.render`) and the v2 protocol (service.v2) format those. :func:`preprocess`
is the service's whole image preparation: core.imaging.load_input under the service's
limits, the same function the training loaders call; an annotated image is decoded once, at
full size, and drawn on (:func:`preprocess_full`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from core.contract import ModelContract
from core.errors import ImageTooLarge, InvalidImage, InvalidOption
from core.geometry import Geometry, resize_to_input
from core.imaging import DecodedImage, header_pixels, load_image, load_input
from core.tasks import Outputs
from service import metrics, render, tracing
from service.batching import BatchResult
from service.endpoints import Endpoint
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
    image: Image.Image | None = None  # the decoded image, kept only to draw on (preprocess_full)


Prepare = Callable[[bytes, ModelContract, Settings], Prepared]


@dataclass
class Inferred:
    """A request's images after inference: per image its preparation and outputs."""

    served: ServedModel
    prepared: list[Prepared]
    outputs: list[Outputs]
    batch_size: int
    started: float   # perf_counter stamps: request start, decode done, inference done
    decoded: float
    inferred: float
    heavy: bool = False  # an image over CONVSERVE_HEAVY_PIXELS: its work runs in the heavy lane
    threads: int = 1  # ONNX Runtime intra-op threads of the run (the most, if several)


def preprocess(data: bytes, contract: ModelContract, settings: Settings) -> Prepared:
    """Decode ``data`` and resize it to ``contract``'s input; InvalidImage / ImageTooLarge.
    Only the model input and the upload's size travel on: the decoded image is dropped here,
    so the pixels a worker holds are those of the decodes in progress."""
    decoded, arr, geometry = load_input(data, contract.input, max_bytes=settings.max_bytes,
                                        max_pixels=settings.max_pixels, max_decoded_bytes=settings.max_decoded_bytes)
    return Prepared(_info(decoded), arr, geometry)


def preprocess_full(data: bytes, contract: ModelContract, settings: Settings) -> Prepared:
    """:func:`preprocess` for an annotated image: one full-size decode (no JPEG draft) that is
    both resized for the model and kept to draw on (reduced to service.render.MAX_PIXELS)."""
    decoded = load_image(data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels,
                         max_decoded_bytes=settings.max_decoded_bytes)
    model_view = decoded.image.convert("L") if contract.input.channels == 1 else decoded.image
    arr, geometry = resize_to_input(model_view, contract.input, orig_size=(decoded.width, decoded.height))
    return Prepared(_info(decoded), arr, geometry, render.canvas(decoded.image))


def _info(decoded: DecodedImage) -> ImageInfo:
    return {"width": decoded.width, "height": decoded.height, "format": decoded.format}


class Pipeline:
    """Answers parsed requests; see the module docstring."""

    def __init__(self, repo: ModelRepository, settings: Settings) -> None:
        self.repo, self.settings = repo, settings
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        # The heavy lane: requests with an image over CONVSERVE_HEAVY_PIXELS decode, post-process
        # and render here, on threads at the lowest CPU priority, so that a stream of huge
        # images (hostile or not) neither queues ahead of ordinary ones in the decode pool nor
        # takes the cores they need (README "Hostile clients" has the measurement).
        self.heavy_pool = ThreadPoolExecutor(settings.heavy_threads, thread_name_prefix="heavy",
                                             initializer=_background_priority)
        self.video_slots = asyncio.Semaphore(settings.max_videos)  # videos decoded at once (service.video)

    def is_heavy(self, images: list[bytes]) -> bool:
        """Whether any of ``images`` is over CONVSERVE_HEAVY_PIXELS (read from its header)."""
        return any(header_pixels(data) > self.settings.heavy_pixels for data in images)

    # --- decode and infer ---------------------------------------------------------------

    async def run(self, served: ServedModel, images: list[bytes], prepare: Prepare = preprocess) -> Inferred:
        """Decode ``images`` for ``served``'s model (with ``prepare``, in the heavy lane when one
        of them is large) and run them through its batcher."""
        t0 = time.perf_counter()
        c = served.model.contract
        loop = asyncio.get_running_loop()
        heavy = self.is_heavy(images)
        pool = self.heavy_pool if heavy else self.pool
        claim = served.batcher.claim_idle_run() if len(images) == 1 and not heavy else None
        if claim is not None:
            # Low load: the model is idle, so decode and run it in one thread, with no queue (on
            # every core when the whole worker is idle: service.placement). Not for a heavy image:
            # its run would be claimed for the whole of its long decode, and ordinary requests
            # would queue behind it (measured: p99 2.3 s under a stream of them).
            ort_seconds: float | None = None
            threads = served.model.threads_for(claim.alone)
            try:
                prepared, batched, t1, ort_seconds = await loop.run_in_executor(
                    pool, _decode_and_run, images[0], served, self.settings, prepare, claim.alone)
            finally:
                served.batcher.release_run(1, ort_seconds, threads, claim.alone)
            tracing.interval("decode", t0, t1, images=1)
        else:
            with tracing.span("decode", images=len(images)):
                prepared = await _each([loop.run_in_executor(pool, prepare, data, c, self.settings)
                                        for data in images])
            t1 = time.perf_counter()
            batched = await _each([served.batcher.submit(p.array) for p in prepared])
        t2 = time.perf_counter()
        _observe(served, batched, t1, t2)
        return Inferred(served, prepared, [b.outputs for b in batched], max(b.batch_size for b in batched), t0, t1, t2,
                        heavy, max(b.threads for b in batched))

    async def run_arrays(self, served: ServedModel, arrays: np.ndarray) -> Inferred:
        """Run model-ready uint8 [N, H, W, C] images (their geometry is the identity)."""
        t0 = time.perf_counter()
        h, w = arrays.shape[1:3]
        geometry = Geometry(w, h, 1.0, 1.0, w, h)
        prepared = [Prepared({"width": w, "height": h, "format": None}, a, geometry) for a in arrays]
        batched = await _each([served.batcher.submit(a) for a in arrays])
        t2 = time.perf_counter()
        _observe(served, batched, t0, t2)
        return Inferred(served, prepared, [b.outputs for b in batched], max(b.batch_size for b in batched), t0, t0, t2,
                        threads=max(b.threads for b in batched))

    async def results(self, endpoint: Endpoint, inferred: Inferred, options: dict[str, Any]) -> list[dict[str, Any]]:
        """The endpoint's JSON-ready result for every image (off the loop when it is heavy)."""
        args = (endpoint, inferred.outputs, [p.geometry for p in inferred.prepared], inferred.served.model.contract,
                options)
        with tracing.span("postprocess"):
            if endpoint.heavy_result(options):
                return await self.in_pool(_results, *args, heavy=inferred.heavy)
            return _results(*args)

    async def in_pool(self, fn: Any, *args: Any, heavy: bool = False) -> Any:
        """``fn(*args)`` in the decode pool (work that takes milliseconds, off the event loop),
        or in the heavy lane for the work of a large request."""
        return await asyncio.get_running_loop().run_in_executor(self.heavy_pool if heavy else self.pool, fn, *args)

    def options_and_model(self, endpoint: Endpoint, raw_options: dict[str, str]
                          ) -> tuple[dict[str, Any], ServedModel]:
        """Typed options and the model they name; InvalidOption / ModelNotFound / WrongTask."""
        options = endpoint.parse_options(raw_options)
        served = self.repo.model_for(endpoint, options["model"])
        endpoint.check_request(served.model.contract, options)
        return options, served

    # --- the endpoints --------------------------------------------------------------------

    async def answer(self, endpoint: Endpoint, upload: Upload) -> tuple[dict[str, Any], ServedModel]:
        """The JSON answer of an endpoint. Raises InvalidOption, ModelNotFound, WrongTask,
        InvalidImage, ImageTooLarge, Overloaded (a full model queue) or, for a failed model,
        anything else."""
        options, served = self.options_and_model(endpoint, upload.options)
        inferred = await self.run(served, upload.images)
        results = await self.results(endpoint, inferred, options)
        t3 = time.perf_counter()
        timing = {"decode_ms": round((inferred.decoded - inferred.started) * 1e3, 3),
                  "inference_ms": round((inferred.inferred - inferred.decoded) * 1e3, 3),
                  "postprocess_ms": round((t3 - inferred.inferred) * 1e3, 3),
                  "total_ms": round((t3 - inferred.started) * 1e3, 3), "batch_size": inferred.batch_size,
                  "threads": inferred.threads}
        images = [p.info for p in inferred.prepared]
        body: dict[str, Any] = {"model": {"name": served.model.name, "version": served.model.version}}
        if len(results) == 1:
            body.update(image=images[0], timing=timing, **results[0])
        else:
            body.update(timing=timing, results=[{"image": im, **r} for im, r in zip(images, results)])
        return body, served

    async def render(self, endpoint: Endpoint, upload: Upload, fmt: str) -> tuple[bytes, ServedModel, float]:
        """The endpoint's answer drawn on the original image, encoded as ``fmt`` (png or jpeg);
        returns (encoded image, model, seconds)."""
        if not endpoint.drawable:
            raise InvalidOption("render", f"/{endpoint.name} answers JSON only; leave render out")
        if len(upload.images) != 1:
            raise InvalidOption("render", f"an annotated image answers one image; this request has "
                                f"{len(upload.images)}")
        options, served = self.options_and_model(endpoint, upload.options)
        inferred = await self.run(served, upload.images, prepare=preprocess_full)
        with tracing.span("render"):
            data = await self.in_pool(_render, inferred, endpoint, options, fmt, heavy=inferred.heavy)
        return data, served, time.perf_counter() - inferred.started


def _background_priority() -> None:
    """Run this (heavy-lane) thread at the lowest CPU priority (Linux: nice is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the lane still queues apart
        pass


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


def _decode_and_run(data: bytes, served: ServedModel, settings: Settings, prepare: Prepare, alone: bool
                    ) -> tuple[list[Prepared], list[BatchResult], float, float]:
    """One image, decoded and run in this thread (on the lone session when ``alone``): its
    preparation, outputs, when the run started and the seconds ONNX Runtime took."""
    prepared = prepare(data, served.model.contract, settings)
    start = time.perf_counter()
    (outputs,) = served.model.infer(prepared.array[None], lone=alone)
    ort_seconds = time.perf_counter() - start
    return [prepared], [BatchResult(outputs, 1, start, start, served.model.threads_for(alone))], start, ort_seconds


def _results(endpoint: Endpoint, outputs: list[Outputs], geometries: list[Geometry], contract: ModelContract,
             options: dict[str, Any]) -> list[dict[str, Any]]:
    return [endpoint.result(out, geo, contract, options) for out, geo in zip(outputs, geometries)]


def _render(inferred: Inferred, endpoint: Endpoint, options: dict[str, Any], fmt: str) -> bytes:
    """The one image of ``inferred`` with its answer drawn on it, encoded as ``fmt``."""
    (prepared,), (outputs,) = inferred.prepared, inferred.outputs
    assert prepared.image is not None  # preprocess_full keeps it
    drawn = render.annotate(prepared.image, endpoint.task.name, outputs, prepared.geometry,
                            inferred.served.model.contract, options)
    return render.encode(drawn, fmt)
