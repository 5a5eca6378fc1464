"""Reading a video upload frame by frame: MP4 (and QuickTime) or WebM (and Matroska), decoded
with PyAV (FFmpeg's libraries), each sampled frame an upright RGB image like core.imaging's.

What a hostile file can make this do is bounded before and while decoding:

- the container is recognised from its first bytes (an ``ftyp`` box, or the EBML magic) and
  opened with that demuxer only: FFmpeg never probes its way into a playlist or image-sequence
  demuxer that would read other files or URLs, and the MP4 demuxer's external data references
  (``dref``) stay off, so the bytes uploaded are all that is read;
- the frame size declared by the stream is checked against ``max_pixels`` before anything is
  decoded, and the decoder itself is opened with that ``max_pixels`` (FFmpeg refuses to
  allocate a larger frame, also when the size changes mid-stream);
- at most ``max_frames`` frames are decoded, sampled or skipped: a declared frame count over
  it is refused before decoding, an undeclared one stops there (:class:`VideoTooLarge`);
- one decoding thread (no frame threading: its extra frames in flight are memory).

Memory of one reader: the upload, the decoder's reference frames (H.264 holds up to 16 at
1.5 bytes a pixel: ~200 MB at 3840x2160, ~7 MB at 640x480) and one RGB frame (3 bytes a pixel).

The display matrix (phones record portrait video as rotated landscape) is applied, as EXIF
orientation is for images. PyAV is imported when a video is opened, not with this module.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image

from core.errors import InvalidVideo, VideoTooLarge

# Container -> (FFmpeg demuxer, demuxer options). Recognised by MAGIC, never probed.
CONTAINERS: dict[str, tuple[str, dict[str, str]]] = {
    "mp4": ("mov", {"enable_drefs": "0", "use_absolute_path": "0"}),
    "webm": ("matroska", {}),
}
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


def container_of(data: bytes) -> str:
    """``mp4`` or ``webm`` from the file's first bytes; InvalidVideo for anything else."""
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == EBML_MAGIC:
        return "webm"
    raise InvalidVideo("not an MP4 (an 'ftyp' box first) or WebM/Matroska (EBML) file")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream."""

    container: str           # mp4 or webm
    codec: str               # h264, vp9, ...
    width: int               # coded frame size (before the display rotation)
    height: int
    fps: float | None        # average frame rate, when declared
    frames: int | None       # frame count, when declared (MP4 declares it; WebM does not)
    duration_s: float | None

    def as_json(self) -> dict[str, Any]:
        return {"container": self.container, "codec": self.codec, "width": self.width, "height": self.height,
                "fps": None if self.fps is None else round(self.fps, 3), "frames": self.frames,
                "duration_s": None if self.duration_s is None else round(self.duration_s, 3)}


@dataclass(frozen=True)
class VideoFrame:
    """One sampled frame: its index among all decoded frames, its time and its upright image."""

    index: int
    time_s: float
    image: Image.Image


class VideoReader:
    """The sampled frames of one video, read on demand with :meth:`next_frame`.
    ``frame_step``: keep every n-th frame (1 = all). Safe to close from another thread: a
    decode in progress finishes first (FFmpeg's state must not be freed under it)."""

    def __init__(self, data: bytes, *, max_pixels: int, max_frames: int, frame_step: int = 1) -> None:
        import av

        container = container_of(data)
        demuxer, options = CONTAINERS[container]
        self.max_frames, self.frame_step = max_frames, max(1, frame_step)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._container = av.open(io.BytesIO(data), format=demuxer, options=options)
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise InvalidVideo(f"the {container} file cannot be read: {_reason(exc)}") from None
        if not self._container.streams.video:
            self.close()
            raise InvalidVideo("the file holds no video stream")
        stream = self._container.streams.video[0]
        ctx = stream.codec_context
        self.info = VideoInfo(container, ctx.name, int(ctx.width or 0), int(ctx.height or 0),
                              float(stream.average_rate) if stream.average_rate else None,
                              int(stream.frames) or None,
                              float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                              else None)
        try:
            self._check(max_pixels)
            ctx.thread_count, ctx.thread_type = 1, "SLICE"
            ctx.options = {"max_pixels": str(max_pixels)}
            self._frames = self._container.decode(stream)
        except BaseException:
            self.close()
            raise
        self.decoded = 0

    def _check(self, max_pixels: int) -> None:
        info = self.info
        if info.width <= 0 or info.height <= 0:
            raise InvalidVideo("the video stream declares no frame size")
        if info.width * info.height > max_pixels:
            raise VideoTooLarge(f"{info.width}x{info.height} frames: {info.width * info.height} pixels; "
                                f"the limit is {max_pixels} a frame")
        if info.frames is not None and info.frames > self.max_frames:
            raise VideoTooLarge(f"the video holds {info.frames} frames; a request may decode at most "
                                f"{self.max_frames} (sample with frame_step, or cut the video)")

    def next_frame(self) -> VideoFrame | None:
        """The next sampled frame, None after the last; InvalidVideo for undecodable data,
        VideoTooLarge past ``max_frames`` decoded frames, None once closed."""
        with self._lock:
            return None if self._closed else self._next()

    def _next(self) -> VideoFrame | None:
        import av

        while True:
            if self.decoded >= self.max_frames:
                if self._more():
                    raise VideoTooLarge(f"the video holds more than {self.max_frames} frames; a request may decode "
                                        "at most that many (sample with frame_step, or cut the video)")
                return None
            try:
                frame = next(self._frames, None)
            except (av.error.FFmpegError, ValueError, OSError, MemoryError) as exc:
                raise InvalidVideo(f"frame {self.decoded} cannot be decoded: {_reason(exc)}") from None
            if frame is None:
                return None
            index = self.decoded
            self.decoded += 1
            if index % self.frame_step:
                continue
            image = frame.to_image()
            turn = _TURNS.get(round(frame.rotation or 0) % 360)
            if turn is not None:
                image = image.transpose(turn)
            seconds = float(frame.time) if frame.time is not None else index / (self.info.fps or 1.0)
            return VideoFrame(index, seconds, image if image.mode == "RGB" else image.convert("RGB"))

    def _more(self) -> bool:
        """Whether another frame follows (decodes it, and drops it)."""
        try:
            return next(self._frames, None) is not None
        except Exception:  # undecodable data after the limit: the limit is the answer
            return True

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    """FFmpeg's message without the file-name part PyAV appends."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text)[:200]


# Counter-clockwise rotation of the display matrix -> the transposition that shows the frame upright.
_TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
