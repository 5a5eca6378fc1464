"""A video POSTed to a task endpoint, answered as JSON lines: one per sampled frame, in order.

``POST /detect`` (or /classify, /segment, /embed) with the video as the body
(``Content-Type: video/mp4`` or ``video/webm``) or as the multipart field ``video``, and the
endpoint's options plus ``frame_step`` (answer every n-th frame). The answer is
``application/x-ndjson``, sent as the frames are answered::

    {"frame": 0, "time_s": 0.0, "detections": [...]}
    {"frame": 5, "time_s": 0.2, "detections": [...]}
    {"done": true, "model": {...}, "video": {...}, "frame_step": 5, "frames": 2, "decoded_frames": 10, ...}

A fault found before the first line (not a video, frames too large, an unknown option) is an
ordinary 4xx answer; one found later (a corrupt frame, more frames than a request may decode)
ends the stream with ``{"error": {"type": ..., "message": ...}}`` as its last line.

Bounds: the body limit, core.video's limits on frames and pixels (CONVSERVE_MAX_VIDEO_FRAMES,
CONVSERVE_MAX_VIDEO_PIXELS), CONVSERVE_MAX_VIDEOS videos decoded at once per worker (more wait
for a slot as requests wait for admission, then 503), and at most a batch of one video's
frames in the model's queue at once: the frames batch with each other and with everyone
else's images, and a video never fills the queue. Each line waits for the client to read the
previous ones (the transport's flow control), so a slow reader slows its own stream only, and
one that stops reading for CONVSERVE_BODY_TIMEOUT_S loses its connection. A client that goes
away stops the decoding, and its queued frames are dropped unrun (service.batching).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from core.geometry import Geometry, resize_to_input
from core.video import VideoReader
from service import metrics
from service.endpoints import FRAME_STEP, Endpoint
from service.errors import Overloaded, client_error, error_body
from service.pipeline import Pipeline
from service.repository import ServedModel

log = logging.getLogger("convserve.video")

CONTENT_TYPE = b"application/x-ndjson"


@dataclass(frozen=True)
class _Frame:
    index: int
    time_s: float
    array: Any  # the model input, uint8 [H, W, C]
    geometry: Geometry


def _next_frame(reader: VideoReader, served: ServedModel) -> _Frame | None:
    """Decode the next sampled frame and resize it to the model's input (a decode thread)."""
    frame = reader.next_frame()
    if frame is None:
        return None
    spec = served.model.contract.input
    view = frame.image.convert("L") if spec.channels == 1 else frame.image
    array, geometry = resize_to_input(view, spec, orig_size=frame.image.size)
    return _Frame(frame.index, frame.time_s, array, geometry)


class VideoAnswer:
    """The JSON lines of one video (:meth:`chunks`), and what holding it costs, given back by
    :meth:`close` whether or not the lines were read."""

    def __init__(self, pipeline: Pipeline, endpoint: Endpoint, served: ServedModel, options: dict[str, Any],
                 reader: VideoReader, frame_step: int, slots: asyncio.Semaphore) -> None:
        self.pipeline, self.endpoint, self.served, self.options = pipeline, endpoint, served, options
        self.reader, self.frame_step, self.slots = reader, frame_step, slots
        self.started = time.perf_counter()
        self._decoding: asyncio.Future | None = None
        self._queued: deque[tuple[_Frame, asyncio.Future]] = deque()
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """One line per sampled frame, then the summary line (or an error line)."""
        window = max(1, self.served.batcher.max_batch)
        answered, ended, failure = 0, False, None
        while True:
            while not ended and failure is None and len(self._queued) < window:
                try:
                    frame = await self._decode()
                except Exception as exc:
                    failure = exc
                    break
                if frame is None:
                    ended = True
                    break
                self._queued.append((frame, asyncio.ensure_future(self.served.batcher.submit(frame.array))))
            if not self._queued:
                break
            frame, queued = self._queued.popleft()
            try:
                result = await self._result(frame, (await queued).outputs)
            except Exception as exc:
                failure = exc
                break
            answered += 1
            yield _line({"frame": frame.index, "time_s": round(frame.time_s, 3), **result})
        if failure is not None:
            yield _line(self._failure(failure))
            return
        seconds = time.perf_counter() - self.started
        metrics.answered(self.served.ref, self.endpoint.name, seconds)
        model = self.served.model
        yield _line({"done": True, "model": {"name": model.name, "version": model.version},
                     "video": self.reader.info.as_json(), "frame_step": self.frame_step, "frames": answered,
                     "decoded_frames": self.reader.decoded, "timing": {"total_ms": round(seconds * 1e3, 3)}})

    async def _decode(self) -> _Frame | None:
        # Shielded: cancelling the request must not mark the decode done while its thread still
        # runs (close() waits for it).
        self._decoding = asyncio.ensure_future(self.pipeline.in_pool(_next_frame, self.reader, self.served))
        return await asyncio.shield(self._decoding)

    async def _result(self, frame: _Frame, outputs: Any) -> dict[str, Any]:
        contract = self.served.model.contract
        if self.endpoint.heavy_result(self.options):
            return await self.pipeline.in_pool(self.endpoint.result, outputs, frame.geometry, contract, self.options)
        return self.endpoint.result(outputs, frame.geometry, contract, self.options)

    def _failure(self, exc: Exception) -> dict[str, Any]:
        known = client_error(exc)
        if known is None:
            log.error("a video for /%s failed at frame %d", self.endpoint.name, self.reader.decoded, exc_info=exc)
            return error_body("internal", "the model failed on a frame of this video; the server log has details")
        metrics.error(self.endpoint.name, known.type)
        return error_body(known.type, known.message)

    async def close(self) -> None:
        """Drop the queued frames (unrun), wait for a decode in progress, close the file and free
        the video slot; once."""
        if self._closed:
            return
        self._closed = True
        for _, queued in self._queued:
            queued.cancel()
        self._queued.clear()
        try:
            if self._decoding is not None and not self._decoding.done():
                await asyncio.shield(self._decoding)
        except BaseException:  # noqa: S110 - its failure was answered, or nobody is listening
            pass
        finally:
            try:
                await self.pipeline.in_pool(self.reader.close)
            finally:
                self.slots.release()


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


async def open_video(pipeline: Pipeline, endpoint: Endpoint, data: bytes, raw_options: dict[str, str]) -> VideoAnswer:
    """Check the options and the file and take a video slot: every fault found here is an
    ordinary error answer. InvalidOption, ModelNotFound, InvalidVideo, VideoTooLarge,
    Overloaded (no video slot free in time)."""
    raw = dict(raw_options)
    frame_step = FRAME_STEP.parse(raw.pop(FRAME_STEP.name)) if FRAME_STEP.name in raw else FRAME_STEP.default
    options, served = pipeline.options_and_model(endpoint, raw)
    settings = pipeline.settings
    slots = pipeline.video_slots
    try:
        if slots.locked():
            await asyncio.wait_for(slots.acquire(), settings.admission_wait_ms / 1e3)
        else:
            await slots.acquire()
    except TimeoutError:
        raise Overloaded(f"this worker decodes {settings.max_videos} video(s) at once and none finished within "
                         f"{settings.admission_wait_ms / 1e3:g} s; retry shortly",
                         headers={"Retry-After": "1"}) from None
    try:
        reader = await pipeline.in_pool(partial(VideoReader, data, max_pixels=settings.max_video_pixels,
                                                max_frames=settings.max_video_frames, frame_step=frame_step))
    except BaseException:
        slots.release()
        raise
    return VideoAnswer(pipeline, endpoint, served, options, reader, frame_step, slots)
