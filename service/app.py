"""The HTTP routes convserve owns: one inference route per endpoint (core.tasks.ENDPOINTS),
/models, the Open Inference Protocol v2 (service.v2), /admin/reload and the playground.

The inference routes are plain ASGI handlers: they read their own bodies (service.uploads),
after admission control (service.admission) has had its say, and hand the parsed request to
the worker's service.pipeline.Pipeline. They are registered as FastAPI routes only for their
OpenAPI description (which BentoML merges into /docs.json: both request forms, every option,
the answer shapes and every error status they really return); serving them skips FastAPI's
per-request machinery (:class:`RawRoute`), which with BentoML's stack around it made the
event loop, and the GIL it holds, the bottleneck of a worker.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Union
from urllib.parse import parse_qsl

from fastapi import Body, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from core import __version__
from core.errors import ImageTooLarge, InvalidImage, InvalidOption, ModelNotFound
from core.repository import version_key
from core.tasks import ENDPOINTS, TASKS, Task
from service import metrics
from service.errors import V2Error, client_error, error_json, send_response
from service.schemas import RESPONSES, ErrorBody, ModelList, ReloadAnswer, V2Error as V2ErrorBody
from service.schemas import V2InferRequest, V2InferResponse, V2ModelMetadata, V2RepositoryEntry, V2ServerMetadata
from service.uploads import IMAGE_FIELD, RAW_TYPES, Limits, TrackedReceive, discard_body, read_body, read_upload

if TYPE_CHECKING:
    from service.service import ConvServe

log = logging.getLogger("convserve.app")
access = logging.getLogger("convserve.access")
STATIC = Path(__file__).resolve().parent / "static"

app = FastAPI(title="convserve", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)

_ERRORS = {
    400: "malformed request (multipart syntax, Content-Length mismatch) or an image Pillow cannot decode",
    401: "API keys are on (CONVSERVE_API_KEYS) and the request has no valid one",
    404: "no such model or version",
    408: "the request body did not arrive in time (CONVSERVE_BODY_TIMEOUT_S)",
    413: "body over CONVSERVE_MAX_BYTES, image over CONVSERVE_MAX_PIXELS, or more images than CONVSERVE_MAX_IMAGES",
    415: "a Content-Type other than multipart/form-data, image/* or application/octet-stream, or a Content-Encoding",
    422: "an option out of range or unknown, a missing 'image', a model of another task or without the output asked for",
    500: "the model failed on this input (the server log has details)",
    503: "this worker holds as much as it may, or is shutting down; retry after Retry-After seconds",
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "model": ErrorBody} for status, text in _ERRORS.items()}
RENDER_TYPES = {"png": b"image/png", "jpeg": b"image/jpeg"}
RENDER_CHOICES = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "true": "png", "1": "png", "false": None, "0": None,
                  "": None}


def _service(app_: Any) -> "ConvServe":
    return app_.state.service


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _query(raw: bytes) -> dict[str, str]:
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


Handler = Callable[["ConvServe", Any], Awaitable[tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]]]


LINGER_BYTES = 8 * 1024 * 1024  # body bytes read and dropped before a 413, so the client reads the answer


async def _admitted(scope: Scope, receive: Receive, send: Send, endpoint: str, handle: Handler,
                    v2_errors: bool = False) -> None:
    """Admit the request, run ``handle`` (it reads the body and answers), map every failure to
    an error answer (the v2 shape under /v2), and free the slot whatever happens."""
    service = _service(scope["app"])
    headers = _headers(scope)
    balancer = service.balancer
    ticket = None
    receive = TrackedReceive(receive)
    linger = False
    started = time.perf_counter()
    try:
        length = headers.get("content-length")
        ticket = await service.admission.admit(int(length) if length and length.isdigit() else None)
        if balancer:
            balancer.publish(service.admission.requests)
        status, body, content_type, extra = await handle(service, (headers, ticket))
        if balancer is not None and balancer.should_close(service.admission.requests):
            extra.append((b"connection", b"close"))  # the client reconnects, maybe to another worker
            metrics.rebalanced()
    except Exception as exc:
        # A refusal at admission (503) closes the connection without reading the body. Tried and
        # measured: reading small bodies and keeping the connection let clients retry at once on
        # it, and under 4x overload the event-loop-bound classifier then spent itself on refusals
        # (goodput 0.27 of the sustained rate, against 0.81 when refused connections close: the
        # clients' reconnections then wait in the kernel's listen backlog, at no cost to us).
        status, body, content_type, extra, type_ = _failure(exc, endpoint, v2_errors)
        metrics.error(endpoint, type_)
        # Refused by its declared length while the body still arrives: read a bounded amount so
        # the client reads the answer (a chunked body over the limit is cut off at once).
        declared = headers.get("content-length", "")
        linger = status == 413 and ticket is not None and declared.isdigit() and int(declared) <= LINGER_BYTES
    finally:
        if ticket is not None:
            ticket.release()
            if balancer:
                balancer.publish(service.admission.requests)
    if linger:  # uvicorn closes the connection as soon as a Connection: close answer is sent
        await discard_body(receive, LINGER_BYTES)
        if not receive.ended and not any(k == b"connection" for k, _ in extra):
            extra.append((b"connection", b"close"))  # the body did not end in time: this connection is done
    await send_response(send, status, body, content_type, extra)
    if service.settings.access_log:
        access.info("%s %s %d %.1f ms %d bytes", scope["method"], scope["path"], status,
                    (time.perf_counter() - started) * 1e3, len(body))


def _failure(exc: Exception, endpoint: str, v2_shape: bool) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]], str]:
    """(status, body, content type, headers, error type) for a failed request; refusals close
    the connection (the rest of the body is not worth reading)."""
    if isinstance(exc, V2Error):
        status, type_, message, headers = exc.status, "invalid_request", exc.message, exc.headers
    else:
        known = client_error(exc)
        if known is None:
            log.exception("/%s failed", endpoint)
            status, type_, message, headers = 500, "internal", "the model failed on this input; the server log has details", {}
        else:
            status, type_, message, headers = known
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if status in (401, 408, 413, 503) and not any(k == b"connection" for k, _ in extra):
        extra.append((b"connection", b"close"))
    return status, error_json(type_, message, v2=v2_shape), b"application/json", extra, type_


# --- the task endpoints -------------------------------------------------------------------------

def render_format(headers: dict[str, str], options: dict[str, str]) -> str | None:
    """png/jpeg when the request asks for an annotated image: ``render`` (png, jpeg, true) or an
    Accept header naming image/png or image/jpeg; None for JSON. Pops ``render`` from ``options``."""
    raw = options.pop("render", None)
    if raw is not None:
        key = raw.strip().lower()
        if key not in RENDER_CHOICES:
            raise InvalidOption("render", f"must be png, jpeg, true or false; got {raw[:40]!r}")
        return RENDER_CHOICES[key]
    accept = headers.get("accept", "").lower()
    for media, fmt in (("image/png", "png"), ("image/jpeg", "jpeg")):
        if media in accept:
            return fmt
    return None


async def _infer(scope: Scope, receive: Receive, send: Send, task: Task) -> None:
    """POST /<endpoint>: admit, read, answer (JSON, or an annotated image)."""

    async def handle(service: "ConvServe", ctx: Any) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        headers, ticket = ctx
        upload = await read_upload(headers, _query(scope["query_string"]), receive, service.limits, ticket.grow)
        fmt = render_format(headers, upload.options)
        if fmt:
            data, served, seconds = await service.pipeline.render(task, upload, fmt)
            metrics.answered(served.ref, task.endpoint, seconds)
            return 200, data, RENDER_TYPES[fmt], []
        body, served = await service.pipeline.answer(task, upload)
        metrics.answered(served.ref, task.endpoint, body["timing"]["total_ms"] / 1e3)
        return 200, _json(body), b"application/json", []

    await _admitted(scope, receive, send, task.endpoint, handle)


class RawRoute(APIRoute):
    """An APIRoute for the OpenAPI document whose requests a raw ASGI handler serves."""

    raw: Callable[[Scope, Receive, Send], Awaitable[None]]

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self.methods:
            await self.raw(scope, receive, send)
        else:  # Starlette's 405 (the error middleware gives it the JSON shape)
            await super().handle(scope, receive, send)


async def _undocumented(request: Request) -> Response:  # documentation only: RawRoute serves
    raise NotImplementedError


async def _v2_infer_doc(request: V2InferRequest = Body(...)) -> Response:  # documents the JSON body
    raise NotImplementedError


def _raw_route(path: str, raw: Callable[[Scope, Receive, Send], Awaitable[None]], methods: list[str], **kw: Any) -> None:
    kw.setdefault("endpoint", _undocumented)
    app.router.add_api_route(path, methods=methods, route_class_override=RawRoute, **kw)
    app.router.routes[-1].raw = raw  # type: ignore[attr-defined]


def _openapi_request(task: Task) -> dict[str, Any]:
    """The requestBody and query parameters of a task's route."""
    options = {o.name: o.json_schema() for o in task.options}
    options["render"] = {"type": "string", "enum": ["png", "jpeg", "true", "false"], "default": "false",
                         "description": "answer with the original image annotated (boxes, masks, labels) as PNG or "
                                        "JPEG instead of JSON; so does an Accept: image/png or image/jpeg header"}
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


def _add_task_route(task: Task) -> None:
    single, batch = RESPONSES[task.endpoint]

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        await _infer(scope, receive, send, task)

    _raw_route(
        f"/{task.endpoint}", raw, ["POST"], name=task.endpoint, summary=task.summary,
        response_model=Union[single, batch],  # type: ignore[arg-type]
        responses={200: {"description": "one image: its result; several: `results`, in order. With render: the "
                                        "annotated image (image/png or image/jpeg)",
                         "content": {"image/png": {}, "image/jpeg": {}}}, **_ERROR_RESPONSES},
        description=(f"{task.summary} Send the image as the multipart field `{IMAGE_FIELD}` with the options as form "
                     "fields, or as the whole body (image/*, application/octet-stream) with the options as query "
                     "parameters."),
        openapi_extra=_openapi_request(task), tags=["inference"])


for _task in ENDPOINTS.values():
    _add_task_route(_task)


@app.get("/models", tags=["models"], summary="Every loaded model", response_model=ModelList,
         responses={401: {"description": _ERRORS[401], "model": ErrorBody}})
def list_models(request: Request) -> dict[str, Any]:
    """Every loaded model (task, endpoints, labels, input, outputs, batch, the providers it really
    runs on, provenance), and the files a reload refused, with why."""
    repo = _service(request.app).repo
    return {"models": repo.describe(), "errors": repo.refused()}


@app.post("/admin/reload", tags=["admin"], summary="Look at the model repository now", response_model=ReloadAnswer,
          responses={401: {"description": "no valid admin key", "model": ErrorBody},
                     403: {"description": "no admin key is configured (CONVSERVE_ADMIN_KEYS)", "model": ErrorBody}})
async def reload_models(request: Request) -> dict[str, Any]:
    """Load new or replaced versions and drop removed ones in this worker at once (every
    worker also looks every CONVSERVE_POLL_S seconds). Needs an admin key."""
    service = _service(request.app)
    report = await service.repo.reload()
    return {**report.as_dict(), "models": [m["name"] + ":" + m["version"] for m in service.repo.describe()],
            "errors": service.repo.refused()}


# --- the Open Inference Protocol v2 ------------------------------------------------------------------
# service.v2 (NumPy, ONNX Runtime) is imported by the handlers, on first use: importing this
# module, as BentoML's supervising process does, must not load the model stack.

async def _v2_simple(scope: Scope, send: Send, answer: Callable[["ConvServe"], tuple[int, Any]]) -> None:
    """A v2 GET: ``answer`` gives (status, JSON document); ModelNotFound is a 404 in the v2 shape."""
    service = _service(scope["app"])
    try:
        status, doc = answer(service)
    except ModelNotFound as exc:
        status, doc = 404, {"error": str(exc)}
    await send_response(send, status, _json(doc), b"application/json")


def _params(scope: Scope) -> tuple[str, str | None]:
    p = scope.get("path_params", {})
    return p["name"], p.get("version")


async def v2_server(scope: Scope, receive: Receive, send: Send) -> None:
    from service import v2

    await _v2_simple(scope, send, lambda s: (200, v2.server_metadata(__version__)))


async def v2_live(scope: Scope, receive: Receive, send: Send) -> None:
    await _v2_simple(scope, send, lambda s: (200, {"live": True}))


async def v2_ready(scope: Scope, receive: Receive, send: Send) -> None:
    await _v2_simple(scope, send, lambda s: (200, {"ready": True}) if s.is_ready() else (503, {"ready": False}))


async def v2_model(scope: Scope, receive: Receive, send: Send) -> None:
    from service import v2

    name, version = _params(scope)

    def answer(s: "ConvServe") -> tuple[int, Any]:
        served = s.repo.lookup(name, version)
        return 200, v2.model_metadata(served, sorted(s.repo.models.get(name, {}), key=version_key))

    await _v2_simple(scope, send, answer)


async def v2_model_ready(scope: Scope, receive: Receive, send: Send) -> None:
    name, version = _params(scope)

    def answer(s: "ConvServe") -> tuple[int, Any]:
        s.repo.lookup(name, version)
        return (200, {"name": name, "ready": True}) if s.is_ready() else (503, {"name": name, "ready": False})

    await _v2_simple(scope, send, answer)


async def v2_infer(scope: Scope, receive: Receive, send: Send) -> None:
    from service import v2

    name, version = _params(scope)

    async def handle(service: "ConvServe", ctx: Any) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        headers, ticket = ctx
        served = service.repo.lookup(name, version)
        body = await read_body(headers, receive, service.limits, ticket.grow)
        raw_length = headers.get(v2.HEADER_LENGTH)
        if raw_length is not None and not raw_length.strip().isdigit():
            raise v2.bad(f"Inference-Header-Content-Length {raw_length[:40]!r} is not a number")
        request = v2.parse_infer(body, int(raw_length) if raw_length else None, served, service.settings.max_images)
        task = TASKS[served.model.contract.task]
        options = task.parse_options(request.options)
        if request.images is not None:
            try:
                ran = await service.pipeline.run(served, request.images)
            except (InvalidImage, ImageTooLarge) as exc:
                raise type(exc)(f"input {served.model.contract.input.name!r}: {exc}") from None
        else:
            ran = await service.pipeline.run_arrays(served, request.arrays)
        geometries = [p.geometry for p in ran.prepared]
        out = await service.pipeline.in_pool(v2.response_tensors, request, task, served, ran.outputs, geometries, options)
        payload, header_length = v2.encode_response(served, request.id, out)
        metrics.answered(served.ref, "v2", ran.inferred - ran.started)
        if header_length is None:
            return 200, payload, b"application/json", []
        return 200, payload, b"application/octet-stream", [(b"inference-header-content-length",
                                                            str(header_length).encode())]

    await _admitted(scope, receive, send, "v2", handle, v2_errors=True)


async def v2_repository_index(scope: Scope, receive: Receive, send: Send) -> None:
    def answer(s: "ConvServe") -> tuple[int, Any]:
        entries = [{"name": m["name"], "version": m["version"], "state": "READY", "reason": ""}
                   for m in s.repo.describe()]
        for e in s.repo.refused():
            p = Path(e["path"])
            entries.append({"name": p.parent.parent.name, "version": p.parent.name, "state": "UNAVAILABLE",
                            "reason": e["error"]})
        return 200, entries

    await _v2_simple(scope, send, answer)


_V2_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"description": d, "model": V2ErrorBody} for s, d in (
        (400, "a malformed request: wrong datatype or shape, a BYTES element that is not an image, an unknown output"),
        (401, _ERRORS[401]), (404, "no such model or version"), (413, _ERRORS[413]),
        (503, _ERRORS[503]))}


def _add_v2_routes() -> None:
    tags = ["v2 (Open Inference Protocol)"]
    _raw_route("/v2", v2_server, ["GET"], name="v2-server", summary="Server metadata", tags=tags,
               response_model=V2ServerMetadata)
    _raw_route("/v2/health/live", v2_live, ["GET"], name="v2-live", summary="200 while the server runs", tags=tags)
    _raw_route("/v2/health/ready", v2_ready, ["GET"], name="v2-ready", tags=tags,
               summary="200 when every model is loaded and warmed up; 503 otherwise (and while shutting down)")
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        suffix = "-version" if "version}" in prefix else ""
        _raw_route(prefix, v2_model, ["GET"], name=f"v2-model{suffix}", tags=tags, response_model=V2ModelMetadata,
                   summary="Model metadata: the input and every output, with datatype and shape",
                   responses={404: _V2_ERRORS[404]})
        _raw_route(f"{prefix}/ready", v2_model_ready, ["GET"], name=f"v2-model-ready{suffix}", tags=tags,
                   summary="200 when the model is loaded and the server ready", responses={404: _V2_ERRORS[404]})
        _raw_route(f"{prefix}/infer", v2_infer, ["POST"], name=f"v2-infer{suffix}", tags=tags,
                   response_model=V2InferResponse, responses=_V2_ERRORS, endpoint=_v2_infer_doc,
                   summary="Inference: encoded images (BYTES [N]) or the model's UINT8 tensor in; raw and task "
                           "outputs out",
                   openapi_extra={"requestBody": {"content": {
                       "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                                    "description": "the JSON request, then binary tensor data; "
                                                                   "Inference-Header-Content-Length says where the "
                                                                   "JSON ends"}}}},
                   description="See README 'Open Inference Protocol v2'. Task options (score_threshold, "
                               "max_detections) go in the request's parameters; the classification extension "
                               "(parameters.classification = k on the scores output) answers 'score:index:label'.")
    _raw_route("/v2/repository/index", v2_repository_index, ["POST"], name="v2-repository-index", tags=tags,
               summary="Every model version in the repository, READY or UNAVAILABLE (with the reason)",
               response_model=list[V2RepositoryEntry])


_add_v2_routes()
app.mount("/playground", StaticFiles(directory=STATIC / "playground", html=True), name="playground")

__all__ = ["app", "Limits"]
