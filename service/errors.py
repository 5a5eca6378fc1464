"""Errors as HTTP: the one place domain errors become status codes, in one JSON shape.

Every error the service returns is ``{"error": {"type": ..., "message": ...}}``. Anything a
client can fix is a 4xx; load shedding is a 503 with Retry-After. core raises domain errors
(core.errors); :func:`client_error` maps them here, and ServiceError subclasses cover
what only the HTTP layer knows about (a full queue, a malformed request). Under /v2 the
shape is the protocol's ``{"error": "..."}`` (:func:`error_json`). :func:`send_response`
is how every raw ASGI handler and middleware of the service sends a whole answer.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from core.errors import (
    GalleryConflict,
    GalleryExists,
    GalleryNotFound,
    ImageTooLarge,
    InvalidGalleryRequest,
    InvalidImage,
    InvalidOption,
    InvalidVideo,
    ItemNotFound,
    ModelNotFound,
    VideoTooLarge,
    WrongTask,
)


class ServiceError(Exception):
    """An error only the HTTP layer knows; subclasses fix the status and the type string."""

    status = 400
    type = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Overloaded(ServiceError):
    status, type = 503, "overloaded"


class GalleriesUnavailable(ServiceError):
    """The gallery store is off (CONVSERVE_GALLERY_URL=off) or cannot be opened: the deployment's
    state, not the request's fault."""

    status, type = 503, "galleries_unavailable"


class V2Error(Exception):
    """A request the Open Inference Protocol layer (service.v2) refuses; ``status`` is a 4xx
    (or 503). Answered as the protocol's ``{"error": "..."}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# Domain error -> (status, type). Anything else reaching a handler is a 500 "internal".
STATUS_OF: dict[type[Exception], tuple[int, str]] = {
    InvalidImage: (400, "invalid_image"),
    ImageTooLarge: (413, "image_too_large"),
    InvalidVideo: (400, "invalid_video"),
    VideoTooLarge: (413, "video_too_large"),
    InvalidOption: (422, "invalid_parameter"),
    WrongTask: (422, "invalid_parameter"),
    ModelNotFound: (404, "unknown_model"),
    GalleryNotFound: (404, "unknown_gallery"),
    ItemNotFound: (404, "unknown_item"),
    GalleryExists: (409, "gallery_exists"),
    GalleryConflict: (409, "gallery_conflict"),
    InvalidGalleryRequest: (422, "invalid_parameter"),
}


def error_body(type_: str, message: str, detail: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type_, "message": message}
    if detail is not None:
        err["detail"] = detail
    return {"error": err}


def error_json(type_: str, message: str, v2: bool = False, detail: Any = None) -> bytes:
    """The compact JSON body of an error: the service's envelope, or the v2 protocol's shape."""
    doc = {"error": message} if v2 else error_body(type_, message, detail)
    return json.dumps(doc, separators=(",", ":")).encode()


class ClientError(NamedTuple):
    status: int
    type: str
    message: str
    headers: dict[str, str]


def client_error(exc: Exception) -> ClientError | None:
    """Status, type, message and headers for an error the client caused (or load shedding);
    None for anything else."""
    if isinstance(exc, ServiceError):
        return ClientError(exc.status, exc.type, exc.message, exc.headers)
    for cls, (status, type_) in STATUS_OF.items():
        if isinstance(exc, cls):
            return ClientError(status, type_, str(exc), {})
    return None


async def send_response(send: Any, status: int, body: bytes, content_type: bytes,
                        headers: list[tuple[bytes, bytes]] | tuple[()] = ()) -> None:
    """One whole ASGI answer: start (content type, length, ``headers``) and body."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


_TYPE_BY_STATUS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                   415: "unsupported_media_type", 422: "invalid_parameter", 429: "too_many_requests",
                   500: "internal", 503: "unavailable"}


class ErrorEnvelopeMiddleware:
    """ASGI middleware that gives every error response the service's JSON shape.

    convserve's own routes answer in that shape already; BentoML answers its own failures as
    ``{"error": "..."}`` and Starlette answers unknown routes and methods in plain text. This
    rewrites any >= 400 response whose body is not already ``{"error": {"type", "message"}}``;
    under ``v2_prefixes`` the shape is the v2 protocol's ``{"error": "..."}`` instead (unknown
    v2 paths and wrong methods included).
    """

    def __init__(self, app: Any, skip_posts_to: tuple[str, ...] = (), v2_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.skip_posts_to = frozenset(skip_posts_to)  # routes whose POSTs answer in the envelope themselves
        self.v2_prefixes = v2_prefixes  # routes with the v2 protocol's error shape

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"] in self.skip_posts_to):
            await self.app(scope, receive, send)
            return
        v2 = bool(self.v2_prefixes) and (scope["path"] + "/").startswith(tuple(p + "/" for p in self.v2_prefixes))
        start: dict | None = None
        chunks: list[bytes] = []

        async def wrapped_send(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                await _send_rewritten(send, start, b"".join(chunks), v2)
                return
            await send(message)

        await self.app(scope, receive, wrapped_send)


async def _send_rewritten(send: Any, start: dict, body: bytes, v2: bool) -> None:
    status = start["status"]
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if v2 and isinstance(doc, dict) and isinstance(doc.get("error"), str):
        new_body = body
    elif not v2 and isinstance(doc, dict) and isinstance(doc.get("error"), dict) and "type" in doc["error"]:
        new_body = body
    else:
        if isinstance(doc, dict) and "error" in doc:
            message, detail = str(doc["error"]), doc.get("detail")
            if isinstance(detail, list) and detail and all(isinstance(d, dict) and "msg" in d for d in detail):
                message = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d['msg']}" for d in detail)
                detail = [{k: d[k] for k in ("loc", "msg", "type") if k in d} for d in detail]
        elif isinstance(doc, (list, tuple)) and doc and isinstance(doc[0], dict) and "error" in doc[0]:
            message, detail = str(doc[0]["error"]), None
        else:
            message, detail = body.decode("utf-8", "replace").strip() or f"HTTP {status}", None
        type_ = "invalid_parameter" if status == 400 and detail is not None else _TYPE_BY_STATUS.get(status, "error")
        if status == 400 and detail is not None:
            status = 422
        new_body = error_json(type_, message, v2=v2, detail=detail)
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
    await send_response(send, status, new_body, b"application/json", headers)
