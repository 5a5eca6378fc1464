"""The HTTP routes convserve owns: one inference route per task (core.tasks), and /models.

The inference routes are plain ASGI handlers: they read their own bodies (service.uploads),
after admission control (service.admission) has had its say, and hand the parsed request to
the worker's service.pipeline.Pipeline. They are registered as FastAPI routes only for their
OpenAPI description (which BentoML merges into /docs.json: both request forms, every option,
the answer shapes and every error status they really return); serving them skips FastAPI's
per-request machinery (:class:`InferenceRoute`), which with BentoML's stack around it made
the event loop, and the GIL it holds, the bottleneck of a worker.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core.tasks import TASKS, Task
from service import metrics
from service.errors import client_error, error_response
from service.schemas import RESPONSES, ErrorBody
from service.uploads import IMAGE_FIELD, RAW_TYPES, Limits, read_upload

if TYPE_CHECKING:
    from service.service import ConvServe

log = logging.getLogger("convserve.app")

app = FastAPI(title="convserve", openapi_url=None, docs_url=None, redoc_url=None)

_ERRORS = {
    400: "malformed request (multipart syntax, Content-Length mismatch) or an image Pillow cannot decode",
    404: "no such model or version",
    408: "the request body did not arrive in time (CONVSERVE_BODY_TIMEOUT_S)",
    413: "body over CONVSERVE_MAX_BYTES, image over CONVSERVE_MAX_PIXELS, or more images than CONVSERVE_MAX_IMAGES",
    415: "a Content-Type other than multipart/form-data, image/* or application/octet-stream",
    422: "an option out of range or unknown, a missing 'image', a model of another task",
    500: "the model failed on this input (the server log has details)",
    503: "this worker holds as much as it may; retry after Retry-After seconds",
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "model": ErrorBody} for status, text in _ERRORS.items()}


def _service(app_: Any) -> "ConvServe":
    return app_.state.service


async def _infer(scope: Scope, receive: Receive, send: Send, task: Task) -> None:
    """POST /<endpoint>: admit, read, answer. Every failure becomes our JSON error."""
    service = _service(scope["app"])
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    balancer = service.balancer
    ticket = None
    close = False
    try:
        length = headers.get("content-length")
        ticket = await service.admission.admit(int(length) if length and length.isdigit() else None)
        if balancer:
            balancer.publish(service.admission.requests)
        query = _query(scope["query_string"])
        upload = await read_upload(headers, query, receive, service.limits, ticket.grow)
        body, served = await service.pipeline.answer(task, upload)
        close = balancer is not None and balancer.should_close(service.admission.requests)
    except Exception as exc:
        known = client_error(exc)
        if known is None:
            log.exception("/%s failed", task.endpoint)
            type_, response = "internal", error_response(500, "internal",
                                                         "the model failed on this input; the server log has details")
        else:
            type_, response = known
            if response.status_code in (408, 413, 503):  # the rest of the body is not worth reading
                response.headers["Connection"] = "close"
        metrics.error(task.endpoint, type_)
        await response(scope, receive, send)
        return
    finally:
        if ticket is not None:
            ticket.release()
            if balancer:
                balancer.publish(service.admission.requests)
    metrics.answered(served.ref, task.endpoint, body["timing"]["total_ms"] / 1e3)
    payload = json.dumps(body, separators=(",", ":")).encode()
    response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:  # this worker holds more than its share: the client reconnects, maybe to another (service.balancing)
        response_headers.append((b"connection", b"close"))
        metrics.rebalanced()
    await send({"type": "http.response.start", "status": 200, "headers": response_headers})
    await send({"type": "http.response.body", "body": payload})


def _query(raw: bytes) -> dict[str, str]:
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}


class InferenceRoute(APIRoute):
    """An APIRoute for the OpenAPI document that serves POSTs with a raw ASGI handler."""

    task: Task

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            await _infer(scope, receive, send, self.task)
        else:
            await super().handle(scope, receive, send)


def _openapi_request(task: Task) -> dict[str, Any]:
    """The requestBody and query parameters of a task's route."""
    options = {o.name: o.json_schema() for o in task.options}
    image = {"type": "string", "format": "binary", "description": "an image file (JPEG, PNG, WebP, BMP, TIFF, GIF)"}
    form = {"type": "object", "required": [IMAGE_FIELD], "properties": {
        IMAGE_FIELD: {"oneOf": [image, {"type": "array", "items": image}],
                      "description": "the image; repeat the field to send several, answered in order"},
        **options}}
    raw = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": form},
            "image/*": raw, **{t: raw for t in RAW_TYPES}}},
        "parameters": [{"name": name, "in": "query", "required": False, "schema": schema,
                        "description": f"{schema['description']} (raw-body requests only; with multipart, "
                                       "send it as a form field)"} for name, schema in options.items()],
    }


def _add_route(task: Task) -> None:
    single, batch = RESPONSES[task.name]

    async def endpoint(request: Request) -> Response:  # documentation only: InferenceRoute serves
        raise NotImplementedError

    app.router.add_api_route(
        f"/{task.endpoint}", endpoint, methods=["POST"], name=task.endpoint, summary=task.summary,
        response_model=Union[single, batch],  # type: ignore[arg-type]
        responses={200: {"description": "one image: its result; several: `results`, in order"}, **_ERROR_RESPONSES},
        description=(f"{task.summary} Send the image as the multipart field `{IMAGE_FIELD}` with the options as form "
                     "fields, or as the whole body (image/*, application/octet-stream) with the options as query "
                     "parameters."),
        openapi_extra=_openapi_request(task), tags=["inference"], route_class_override=InferenceRoute)
    app.router.routes[-1].task = task  # type: ignore[attr-defined]


for _task in TASKS.values():
    _add_route(_task)


@app.get("/models", tags=["models"], summary="Every loaded model")
def list_models(request: Request) -> dict[str, Any]:
    """Every loaded model: task, endpoint, labels, input, batch, the providers it really runs on, provenance."""
    return {"models": _service(request.app).repo.describe()}


__all__ = ["app", "Limits"]
