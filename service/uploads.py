"""Reading an inference request body ourselves: streamed, capped while reading, in memory.

Two ways to send images (README "API"), and a video the same two ways (service.video):

- ``multipart/form-data``: one or more ``image`` parts (repeat the field for several images,
  answered in order) and the options as fields or query parameters (not both for one
  option). Parsed by python-multipart's streaming
  parser as the body arrives; file names are ignored, nothing touches the disk, and a text
  field is data, never a URL to fetch.
- a raw body: ``Content-Type: image/*`` or ``application/octet-stream``, one image, the
  options as query parameters.
- a video: the raw body with ``Content-Type: video/mp4`` or ``video/webm`` (VIDEO_TYPES),
  or the one multipart field ``video`` instead of images.

The byte limit is enforced while reading (also for chunked bodies without a
Content-Length), the body must arrive within a deadline, and every malformed request is an
:class:`UploadError` with a 4xx status naming what is wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from service.errors import ServiceError

Receive = Callable[[], Awaitable[dict[str, Any]]]

IMAGE_FIELD = "image"
VIDEO_FIELD = "video"
MAX_PARTS = 64            # image parts plus option fields
MAX_FIELD_BYTES = 1024    # an option value (top_k=5, model=name:version, ...)
MAX_HEADER_BYTES = 4096   # a part's headers, together
RAW_TYPES = ("application/octet-stream",)
VIDEO_TYPES = ("video/mp4", "video/quicktime", "video/webm", "video/x-matroska")  # core.video reads these
_DATA_FIELDS = (IMAGE_FIELD, VIDEO_FIELD)


class UploadError(ServiceError):
    """A request body the service will not read; ``status`` is 400, 408, 413, 415 or 422."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type = status, type_


def malformed(message: str) -> UploadError:
    return UploadError(400, "malformed_request", message)


@dataclass
class Upload:
    """The images of one request, in order (or its one video), and its options as raw strings."""

    images: list[bytes]
    options: dict[str, str] = field(default_factory=dict)
    video: bytes | None = None


@dataclass(frozen=True)
class Limits:
    max_bytes: int        # whole body
    max_images: int       # image parts per request
    timeout_s: float      # to receive the whole body


async def read_upload(headers: dict[str, str], query: dict[str, str], receive: Receive, limits: Limits,
                      on_bytes: Callable[[int], None] | None = None) -> Upload:
    """Read and parse the body of an inference request.

    ``headers``: lower-case names. ``query``: the query parameters (options; with multipart,
    form fields may carry them too, but not the same one twice). ``on_bytes`` is told about
    every chunk's size as it arrives (admission control counts body bytes in flight).
    """
    content_type, params = parse_options_header(headers.get("content-type", ""))
    ctype = content_type.decode("latin-1")
    length = _content_length(headers, limits.max_bytes)
    _identity_only(headers)
    if ctype == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise malformed("multipart/form-data without a boundary parameter in Content-Type")
        if len(boundary) > 70:
            raise malformed("the multipart boundary is longer than 70 characters (RFC 2046)")
        form = _Form(boundary, limits)
        await _stream(receive, limits, length, on_bytes, form.write)
        return form.finish(query)
    video = ctype in VIDEO_TYPES
    if video or ctype.startswith("image/") or ctype in RAW_TYPES:
        body = bytearray()
        await _stream(receive, limits, length, on_bytes, body.extend)
        if not body:
            raise UploadError(422, "invalid_parameter", f"the request body is empty: send the "
                              f"{'video' if video else 'image'} as the body")
        return Upload([], dict(query), video=bytes(body)) if video else Upload([bytes(body)], dict(query))
    if not ctype:
        raise UploadError(415, "unsupported_media_type", "no Content-Type: send multipart/form-data with an "
                          "'image' field, or the image itself as image/* or application/octet-stream (a video as "
                          "video/mp4 or video/webm)")
    raise UploadError(415, "unsupported_media_type", f"Content-Type {ctype[:60]!r} is not accepted: send "
                      "multipart/form-data with an 'image' field, the image as image/* or application/octet-stream, "
                      f"or a video as {' or '.join(VIDEO_TYPES)}")


async def read_body(headers: dict[str, str], receive: Receive, limits: Limits,
                    on_bytes: Callable[[int], None] | None = None) -> bytes:
    """The whole body of a request (the v2 protocol's JSON and binary tensors), under the same
    byte limit and deadline; a gzip or deflate Content-Encoding is undone, its output capped
    at the byte limit too."""
    length = _content_length(headers, limits.max_bytes)
    body = bytearray()
    await _stream(receive, limits, length, on_bytes, body.extend)
    encoding = _content_encoding(headers)
    if encoding is None:
        return bytes(body)
    if encoding not in ("gzip", "deflate"):
        raise UploadError(415, "unsupported_media_type", f"Content-Encoding {encoding[:40]!r} is not accepted "
                          "(gzip, deflate or none)")
    import zlib

    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(bytes(body), limits.max_bytes + 1)
    except zlib.error as exc:
        raise malformed(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(out) > limits.max_bytes or inflater.unconsumed_tail:
        raise UploadError(413, "payload_too_large",
                          f"the decompressed body exceeds the limit of {limits.max_bytes} bytes")
    return out


class TrackedReceive:
    """``receive`` that remembers whether the body has been read to its end (``ended``, and
    the event ``read`` for whoever waits for it)."""

    def __init__(self, receive: Receive) -> None:
        self.receive, self.ended = receive, False
        self.read = asyncio.Event()

    async def __call__(self) -> dict[str, Any]:
        message = await self.receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self.ended = True
            self.read.set()
        return message


async def discard_body(receive: TrackedReceive, max_bytes: int, seconds: float = 1.0) -> None:
    """Before refusing a request whose body is still arriving, read and drop up to ``max_bytes``
    of it for up to ``seconds`` (a lingering close): a client still sending then reads the
    refusal instead of a broken pipe."""
    deadline = time.monotonic() + seconds
    seen = 0
    while not receive.ended and seen <= max_bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            return
        seen += len(message.get("body", b""))


def _content_encoding(headers: dict[str, str]) -> str | None:
    """The body's Content-Encoding, lower case; None for none (or identity)."""
    encoding = headers.get("content-encoding", "").strip().lower()
    return None if encoding in ("", "identity") else encoding


def _identity_only(headers: dict[str, str]) -> None:
    encoding = _content_encoding(headers)
    if encoding is not None:
        raise UploadError(415, "unsupported_media_type", f"Content-Encoding {encoding[:40]!r} is not accepted here: "
                          "send the image uncompressed (images are compressed already)")


def _content_length(headers: dict[str, str], max_bytes: int) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise malformed(f"Content-Length {raw[:40]!r} is not a number")
    length = int(raw)
    if length > max_bytes:
        raise UploadError(413, "payload_too_large", f"the request body is {length} bytes; the limit is {max_bytes}")
    return length


async def _stream(receive: Receive, limits: Limits, length: int | None, on_bytes: Callable[[int], None] | None,
                  sink: Callable[[bytes], Any]) -> None:
    """Feed the body's chunks to ``sink``, stopping at the byte limit and the deadline."""
    deadline = time.monotonic() + limits.timeout_s
    total = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise UploadError(408, "request_timeout",
                              f"the request body did not arrive within {limits.timeout_s:g} s") from None
        if message["type"] == "http.disconnect":
            raise UploadError(400, "client_disconnected", "the client closed the connection before the body ended")
        chunk = message.get("body", b"")
        if chunk:
            total += len(chunk)
            if total > limits.max_bytes:
                raise UploadError(413, "payload_too_large",
                                  f"the request body exceeds the limit of {limits.max_bytes} bytes")
            if on_bytes:
                on_bytes(len(chunk))
            sink(chunk)
        if not message.get("more_body", False):
            break
    if length is not None and total != length:
        raise malformed(f"the body is {total} bytes; Content-Length said {length}")


class _Form:
    """Collects the parts of a multipart/form-data body as python-multipart parses it."""

    def __init__(self, boundary: bytes, limits: Limits) -> None:
        self.limits = limits
        self.images: list[bytes] = []
        self.video: bytes | None = None
        self.fields: dict[str, str] = {}
        self.parts = 0
        self.ended = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._field, self._value, self._header_bytes = b"", b"", 0
        self._name: str | None = None
        self._data = bytearray()
        self.parser = MultipartParser(boundary, callbacks={  # type: ignore[arg-type]
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        })

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise malformed(f"malformed multipart body: {exc}") from None

    def finish(self, query: dict[str, str]) -> Upload:
        try:
            self.parser.finalize()
        except MultipartParseError as exc:
            raise malformed(f"malformed multipart body: {exc}") from None
        if not self.ended:
            raise malformed("the multipart body ends before its closing boundary")
        twice = sorted(set(query) & set(self.fields))
        if twice:
            raise UploadError(422, "invalid_parameter", f"{', '.join(twice)}: given both as a form field and as a "
                              "query parameter; send each option once")
        if self.video is not None:
            if self.images:
                raise UploadError(422, "invalid_parameter", f"both '{IMAGE_FIELD}' and '{VIDEO_FIELD}' fields: send "
                                  "images or one video")
            return Upload([], {**query, **self.fields}, video=self.video)
        if not self.images:
            raise UploadError(422, "invalid_parameter",
                              f"no '{IMAGE_FIELD}' field: send the image file as '{IMAGE_FIELD}'")
        return Upload(self.images, {**query, **self.fields})

    # --- python-multipart callbacks ---------------------------------------------------

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise malformed(f"more than {MAX_PARTS} parts in the multipart body")
        self._headers, self._name, self._data, self._header_bytes = [], None, bytearray(), 0
        self._field = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]
        self._count_header(end - start)

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        self._count_header(end - start)

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise malformed(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")

    def _header_end(self) -> None:
        self._headers.append((self._field.lower(), self._value))
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        disposition = next((v for k, v in self._headers if k == b"content-disposition"), None)
        if disposition is None:
            raise malformed("a multipart part has no Content-Disposition header")
        kind, params = parse_options_header(disposition)
        name = params.get(b"name")
        if kind != b"form-data" or name is None:
            raise malformed("a multipart part's Content-Disposition is not form-data with a name")
        self._name = name.decode("utf-8", "replace")
        if self._name == IMAGE_FIELD:
            if len(self.images) >= self.limits.max_images:
                raise UploadError(413, "too_many_images", f"more than {self.limits.max_images} images in one request")
        elif self._name == VIDEO_FIELD:
            if self.video is not None:
                raise UploadError(422, "invalid_parameter", f"more than one '{VIDEO_FIELD}' field: one video a request")
        elif self._name in self.fields:
            raise UploadError(422, "invalid_parameter", f"field {self._name[:60]!r} is given twice")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        if self._name not in _DATA_FIELDS and len(self._data) > MAX_FIELD_BYTES:
            raise UploadError(422, "invalid_parameter", f"field {str(self._name)[:60]!r} is longer than "
                              f"{MAX_FIELD_BYTES} bytes; only '{IMAGE_FIELD}' and '{VIDEO_FIELD}' carry data")

    def _part_end(self) -> None:
        if self._name == IMAGE_FIELD:
            self.images.append(bytes(self._data))
        elif self._name == VIDEO_FIELD:
            self.video = bytes(self._data)
        elif self._name is not None:
            try:
                self.fields[self._name] = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadError(422, "invalid_parameter", f"field {self._name[:60]!r} is not UTF-8 text") from None
        self._data = bytearray()

    def _end(self) -> None:
        self.ended = True
