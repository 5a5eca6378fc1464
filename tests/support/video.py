"""Test videos made by the test itself: frames encoded with PyAV (FFmpeg's encoders), and the
frames a decoder gives back from them (what the service sees)."""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image

# container -> (PyAV format, codec)
FORMATS = {"mp4": ("mp4", "libx264"), "webm": ("webm", "libvpx-vp9")}


def encode(frames: list[Image.Image], container: str = "mp4", fps: int = 10, rotation: int | None = None) -> bytes:
    """``frames`` (one size, even sides) as an MP4 (H.264) or WebM (VP9) file; ``rotation``: a
    display matrix turning the picture that many degrees counter-clockwise."""
    fmt, codec = FORMATS[container]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img.convert("RGB"))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode(data: bytes) -> list[np.ndarray]:
    """Every frame of ``data`` as RGB arrays, as FFmpeg decodes it (no display rotation)."""
    with av.open(io.BytesIO(data)) as f:
        return [frame.to_ndarray(format="rgb24") for frame in f.decode(video=0)]
