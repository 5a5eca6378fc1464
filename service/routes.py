"""convserve's raw ASGI routes as a table: one inference route per endpoint
(service.endpoints.ENDPOINTS) and the Open Inference Protocol v2 (service.v2), each with its
OpenAPI description (service.schemas). service.app registers :data:`ROUTES`.

service.v2 (NumPy, ONNX Runtime) is imported by the handlers, on first use: importing this
module, as BentoML's supervising process does, must not load the model stack.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Body
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core import __version__
from core.errors import InvalidOption, ModelNotFound
from core.repository import parse_model_path, version_key
from service import metrics
from service.asgi import Answer, Call, Handler, RawHandler, serve_admitted
from service.endpoints import ENDPOINTS, Endpoint
from service.errors import send_response
from service.schemas import (
    ERROR_RESPONSES,
    GALLERY_ERRORS,
    RESPONSES,
    V2_ERROR_RESPONSES,
    GalleryCreate,
    GalleryDeleted,
    GalleryInfo,
    GalleryList,
    ItemAdded,
    ItemList,
    ItemRemoved,
    SearchAnswer,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2RepositoryEntry,
    V2ServerMetadata,
    endpoint_request,
    image_request,
    path_parameters,
    query_parameters,
)
from service.uploads import IMAGE_FIELD, RAW_TYPES, VIDEO_FIELD, VIDEO_TYPES, read_body, read_upload
from service.worker import Worker, worker_of

# v2 bodies larger than this are parsed in the heavy lane: checking and parsing a 32 MiB JSON
# body takes tens of milliseconds of CPU that ordinary requests should not wait behind.
HEAVY_BODY_BYTES = 8 * 1024 * 1024
RENDER_TYPES = {"png": b"image/png", "jpeg": b"image/jpeg"}
RENDER_CHOICES = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "true": "png", "1": "png", "false": None, "0": None,
                  "": None}


@dataclass(frozen=True)
class Route:
    """A raw route: its path, methods, handler and OpenAPI description (APIRoute's keywords)."""

    path: str
    methods: list[str]
    handler: RawHandler
    doc: dict[str, Any] = field(default_factory=dict)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# --- the endpoints ------------------------------------------------------------------------------

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


def endpoint_handler(endpoint: Endpoint) -> Handler:
    """POST /<endpoint>: read the upload, answer JSON or (render) an annotated image."""

    async def handle(worker: Worker, call: Call) -> Answer:
        upload = await read_upload(call.headers, call.query, call.receive, worker.limits, call.ticket.grow)
        if upload.video is not None:
            from service import video

            if "render" in upload.options:
                raise InvalidOption("render", "a video is answered as JSON lines; leave render out")
            return Answer(200, b"", video.CONTENT_TYPE, stream=await video.open_video(
                worker.pipeline, endpoint, upload.video, upload.options))
        fmt = render_format(call.headers, upload.options)
        if fmt:
            data, served, seconds = await worker.pipeline.render(endpoint, upload, fmt)
            metrics.answered(served.ref, endpoint.name, seconds)
            return Answer(200, data, RENDER_TYPES[fmt])
        body, served = await worker.pipeline.answer(endpoint, upload)
        metrics.answered(served.ref, endpoint.name, body["timing"]["total_ms"] / 1e3)
        return Answer(200, _json(body))

    return handle


def admitted(route: str, handle: Handler, v2_errors: bool = False) -> RawHandler:
    """The raw handler that serves ``handle`` after admission (service.asgi.serve_admitted),
    its failures answered in the error shape (v2's with ``v2_errors``) and counted under ``route``."""

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        await serve_admitted(scope, receive, send, route, handle, v2_errors=v2_errors)

    return raw


def _endpoint_route(endpoint: Endpoint) -> Route:
    single, batch = RESPONSES[endpoint.name]
    return Route(f"/{endpoint.name}", ["POST"], admitted(endpoint.name, endpoint_handler(endpoint)), dict(
        name=endpoint.name, summary=endpoint.summary, tags=["inference"],
        response_model=single | batch,
        responses={200: {"description": "one image: its result; several: `results`, in order. With render: the "
                                        "annotated image (image/png or image/jpeg). A video: JSON lines",
                         "content": {"image/png": {}, "image/jpeg": {}, "application/x-ndjson": {}}},
                   **ERROR_RESPONSES},
        description=(f"{endpoint.summary} Send the image as the multipart field `{IMAGE_FIELD}` or as the whole body "
                     "(image/*, application/octet-stream); options as query parameters or, with multipart, as form "
                     f"fields. A video (MP4, WebM) goes as the field `{VIDEO_FIELD}` or the whole body "
                     "(video/mp4, video/webm): one JSON line per sampled frame (README 'Videos')."),
        openapi_extra=endpoint_request(endpoint, IMAGE_FIELD, RAW_TYPES, VIDEO_FIELD, VIDEO_TYPES)))


# --- the Open Inference Protocol v2 -------------------------------------------------------------

V2Answer = Callable[[Worker, dict[str, str]], tuple[int, Any]]


def _v2_get(answer: V2Answer) -> RawHandler:
    """A v2 GET: ``answer`` gives (status, JSON document); ModelNotFound is a 404 in the v2 shape."""

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, doc = answer(worker_of(scope["app"]), scope.get("path_params", {}))
        except ModelNotFound as exc:
            status, doc = 404, {"error": str(exc)}
        await send_response(send, status, _json(doc), b"application/json")

    return raw


def v2_server(worker: Worker, params: dict[str, str]) -> tuple[int, Any]:
    from service import v2

    return 200, v2.server_metadata(__version__)


def v2_live(worker: Worker, params: dict[str, str]) -> tuple[int, Any]:
    return 200, {"live": True}


def v2_ready(worker: Worker, params: dict[str, str]) -> tuple[int, Any]:
    return (200, {"ready": True}) if worker.is_ready() else (503, {"ready": False})


def v2_model(worker: Worker, params: dict[str, str]) -> tuple[int, Any]:
    from service import v2

    served = worker.repo.lookup(params["name"], params.get("version"))
    return 200, v2.model_metadata(served, sorted(worker.repo.models.get(params["name"], {}), key=version_key))


def v2_model_ready(worker: Worker, params: dict[str, str]) -> tuple[int, Any]:
    worker.repo.lookup(params["name"], params.get("version"))
    ready = worker.is_ready()
    return (200 if ready else 503), {"name": params["name"], "ready": ready}


def v2_repository_index(worker: Worker, params: dict[str, str]) -> tuple[int, Any]:
    entries = [{"name": m["name"], "version": m["version"], "state": "READY", "reason": ""}
               for m in worker.repo.describe()]
    for e in worker.repo.refused():
        _, name, version = parse_model_path(Path(e["path"]))
        entries.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": e["error"]})
    return 200, entries


async def v2_infer(worker: Worker, call: Call) -> Answer:
    """POST /v2/models/{name}[/versions/{version}]/infer."""
    from service import v2

    params = call.path_params
    served = worker.repo.lookup(params["name"], params.get("version"))
    header_length = v2.header_length(call.headers)
    body = await read_body(call.headers, call.receive, worker.limits, call.ticket.grow)
    args = (body, header_length, served, worker.settings.max_images)
    if len(body) <= v2.INLINE_BYTES:
        request = v2.parse_infer(*args)
    else:
        request = await worker.pipeline.in_pool(v2.parse_infer, *args, heavy=len(body) > HEAVY_BODY_BYTES)
    out, inferred = await v2.run(worker.pipeline, served, request)
    payload, json_length = v2.encode_response(served, request.id, out)
    metrics.answered(served.ref, "v2", inferred.inferred - inferred.started)
    if json_length is None:
        return Answer(200, payload)
    return Answer(200, payload, b"application/octet-stream",
                  [(b"inference-header-content-length", str(json_length).encode())])


async def _v2_infer_doc(request: V2InferRequest = Body(...)) -> Response:  # documents the JSON body
    raise NotImplementedError


def _v2_routes() -> list[Route]:
    tags = ["v2 (Open Inference Protocol)"]
    routes = [
        Route("/v2", ["GET"], _v2_get(v2_server), dict(name="v2-server", summary="Server metadata", tags=tags,
                                                        response_model=V2ServerMetadata)),
        Route("/v2/health/live", ["GET"], _v2_get(v2_live), dict(name="v2-live", tags=tags,
                                                                  summary="200 while the server runs")),
        Route("/v2/health/ready", ["GET"], _v2_get(v2_ready), dict(
            name="v2-ready", tags=tags,
            summary="200 when every model is loaded and warmed up; 503 otherwise (and while shutting down)")),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        suffix = "-version" if "version}" in prefix else ""
        routes += [
            Route(prefix, ["GET"], _v2_get(v2_model), dict(
                name=f"v2-model{suffix}", tags=tags, response_model=V2ModelMetadata,
                summary="Model metadata: the input and every output, with datatype and shape",
                responses={404: V2_ERROR_RESPONSES[404]})),
            Route(f"{prefix}/ready", ["GET"], _v2_get(v2_model_ready), dict(
                name=f"v2-model-ready{suffix}", tags=tags, responses={404: V2_ERROR_RESPONSES[404]},
                summary="200 when the model is loaded and the server ready")),
            Route(f"{prefix}/infer", ["POST"], admitted("v2", v2_infer, v2_errors=True), dict(
                name=f"v2-infer{suffix}", tags=tags, response_model=V2InferResponse, responses=V2_ERROR_RESPONSES,
                endpoint=_v2_infer_doc,
                summary="Inference: encoded images (BYTES [N]) or the model's UINT8 tensor in; "
                        "raw and task outputs out",
                openapi_extra={"requestBody": {"content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                                 "description": "the JSON request, then binary tensor data; "
                                                                "Inference-Header-Content-Length says where the "
                                                                "JSON ends"}}}},
                description="See README 'Open Inference Protocol v2'. Task options (score_threshold, "
                            "max_detections) go in the request's parameters; the classification extension "
                            "(parameters.classification = k on the scores output) answers 'score:index:label'.")),
        ]
    routes.append(Route("/v2/repository/index", ["POST"], _v2_get(v2_repository_index), dict(
        name="v2-repository-index", tags=tags, response_model=list[V2RepositoryEntry],
        summary="Every model version in the repository, READY or UNAVAILABLE (with the reason)")))
    for route in routes:  # path parameters, which FastAPI finds only in an endpoint function's signature
        extra = route.doc.setdefault("openapi_extra", {})
        if path_parameters(route.path):
            extra["parameters"] = path_parameters(route.path)
    return routes


# --- galleries ----------------------------------------------------------------------------------

_GALLERY_PATHS = {"name": "the gallery's name", "item_id": "the item's id"}


def _gallery_routes() -> list[Route]:
    """/galleries (service.galleries): create, list, drop; add, list and remove items; search by image."""
    from service import galleries as g

    tags = ["galleries"]

    def route(path: str, method: str, name: str, handle: Handler, summary: str, response: Any,
              extra: dict[str, Any] | None = None, status: int = 200, **doc: Any) -> Route:
        openapi = {**(extra or {})}
        openapi["parameters"] = [*path_parameters(path, _GALLERY_PATHS), *openapi.get("parameters", [])]
        return Route(path, [method], admitted(name, handle), dict(
            name=name, summary=summary, tags=tags, response_model=response, status_code=status,
            responses=GALLERY_ERRORS, openapi_extra=openapi, **doc))

    one = "/galleries/{name}"
    return [
        route("/galleries", "GET", "galleries", g.list_galleries, "Every gallery, by name", GalleryList),
        route("/galleries", "POST", "galleries_create", g.create_gallery,
              "Create a gallery bound to an embedding model version (JSON: name, model)", GalleryInfo,
              status=201, endpoint=_gallery_create_doc),
        route(one, "GET", "gallery", g.get_gallery, "A gallery: its model, dimension and item count", GalleryInfo),
        route(one, "DELETE", "gallery_drop", g.drop_gallery, "Delete a gallery and its items", GalleryDeleted),
        route(f"{one}/items", "POST", "galleries_add", g.add_item,
              "Add an image (embedded by the gallery's model) with an id and JSON metadata; an id again replaces it",
              ItemAdded, image_request(g.ITEM_OPTIONS, IMAGE_FIELD, RAW_TYPES), status=201),
        route(f"{one}/items", "GET", "gallery_items", g.list_items, "The gallery's items, in the order they were "
              "added, a page at a time", ItemList, {"parameters": query_parameters(g.PAGE_OPTIONS)}),
        route(f"{one}/items/{{item_id}}", "DELETE", "gallery_remove", g.remove_item, "Remove an item", ItemRemoved),
        route(f"{one}/search", "POST", "galleries_search", g.search,
              "The k items most similar to an image (cosine similarity of the gallery model's embeddings)",
              SearchAnswer, image_request(g.SEARCH_OPTIONS, IMAGE_FIELD, RAW_TYPES)),
    ]


async def _gallery_create_doc(request: GalleryCreate = Body(...)) -> Response:  # documents the JSON body
    raise NotImplementedError


# Every raw route, in registration order.
ROUTES: list[Route] = [*(_endpoint_route(e) for e in ENDPOINTS.values()), *_v2_routes(), *_gallery_routes()]
