"""Galleries: named collections of image embeddings, searchable by image (``/galleries``).

A gallery is bound, when it is created, to one embedding model version (a model /embed
serves: an embedding model, or a classifier exported with ``--embedding``). Items are added
by uploading an image with an ``id`` and JSON ``metadata``; a search uploads an image and
answers the ``k`` nearest items by cosine similarity, above an optional ``threshold``. Both
embed the image through the same pipeline as ``/embed`` (admission, limits, batching), then
write to or read from the store (service.gallery_store: SQLite with exact NumPy search in
each worker, the default; service.gallery_pgvector: PostgreSQL with pgvector, for galleries
shared beyond one machine; CONVSERVE_GALLERY_URL chooses).

Vectors of different model versions are not comparable, so a gallery refuses any other
version (409 ``gallery_conflict``, naming both), and says the same when its version is no
longer loaded. Routes (README "Galleries"):

- ``GET /galleries``, ``POST /galleries`` (JSON ``{"name", "model"}``), ``GET`` and
  ``DELETE /galleries/{name}``;
- ``POST /galleries/{name}/items`` (an image, ``id``, ``metadata``), ``GET`` the items (paged:
  ``offset``, ``limit``), ``DELETE /galleries/{name}/items/{item_id}``;
- ``POST /galleries/{name}/search`` (an image, ``k``, ``threshold``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import GalleryConflict, InvalidGalleryRequest, InvalidOption, ItemNotFound, ModelNotFound
from service import metrics
from service.asgi import Answer, Call
from service.endpoints import ENDPOINTS, Option, parse_options
from service.errors import GalleriesUnavailable
from service.settings import GALLERIES_OFF
from service.uploads import Upload, UploadError, read_body, read_upload
from service.worker import Worker

if TYPE_CHECKING:
    from service.gallery_store import Gallery, GalleryStore
    from service.repository import ServedModel

log = logging.getLogger("convserve.galleries")
EMBED = ENDPOINTS["embed"]
MAX_CREATE_BYTES = 16 * 1024  # a create request's JSON body
# Options of the item and search routes (query parameters or multipart form fields).
ITEM_ID = Option("id", str, "", "the item's id (1-256 characters, no control characters; empty: a random UUID is "
                 "given); adding an id again replaces its image and metadata")
METADATA = Option("metadata", str, "{}", "a JSON object stored with the item and returned by searches "
                  "(at most CONVSERVE_GALLERY_MAX_METADATA_BYTES as compact JSON)")
MODEL = Option("model", str, "", "optional: the model name or name:version the caller expects; a gallery answers "
               "409 if it is bound to another")
K = Option("k", int, 5, "how many nearest items to return, best first", 1, 1000)
THRESHOLD = Option("threshold", float, -1.0, "only items at least this similar (cosine, -1..1)", -1.0, 1.0)
OFFSET = Option("offset", int, 0, "items to skip (in the order they were added)", 0, 10**9)
LIMIT = Option("limit", int, 100, "items to list", 1, 1000)
ITEM_OPTIONS = (ITEM_ID, METADATA, MODEL)
SEARCH_OPTIONS = (K, THRESHOLD, MODEL)
PAGE_OPTIONS = (OFFSET, LIMIT)

_stores: dict[str, GalleryStore] = {}
_stores_lock = threading.Lock()


def open_store(url: str) -> GalleryStore:
    """The store at ``url`` (``sqlite:///<file>`` or ``postgresql://...``), opened once per
    process; GalleriesUnavailable when galleries are off or the store cannot be opened (a
    read-only file system, an unreachable database: logged with the reason, tried again at the
    next request)."""
    if url == GALLERIES_OFF:
        raise GalleriesUnavailable("galleries are off on this deployment (CONVSERVE_GALLERY_URL=off: its replicas "
                                   "share no gallery store; set it to postgresql://... to have galleries)")
    with _stores_lock:
        if url not in _stores:
            try:
                _stores[url] = _open(url)
            except Exception as exc:
                log.error("the gallery store %s cannot be opened: %s: %s", url.split("://")[0], type(exc).__name__, exc)
                raise GalleriesUnavailable("the gallery store cannot be opened (the server log says why); the "
                                           "service's other routes are unaffected") from None
        return _stores[url]


def _open(url: str) -> GalleryStore:
    if url.startswith("sqlite:///"):
        from service.gallery_store import SqliteGalleryStore

        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteGalleryStore(path)
    from service.gallery_pgvector import PgvectorGalleryStore

    return PgvectorGalleryStore(url)


def _store(worker: Worker) -> GalleryStore:
    return open_store(worker.settings.gallery_url)


def describe(gallery: Gallery) -> dict[str, Any]:
    return {"name": gallery.name, "model": {"name": gallery.model, "version": gallery.version},
            "dimension": gallery.dimension, "metric": gallery.metric, "count": gallery.count,
            "created_at": round(gallery.created_at, 3)}


def embedding_dimension(served: ServedModel) -> int:
    """The length of the model's embeddings: its contract's, or its graph output's last axis."""
    c = served.model.contract
    if c.embedding is not None:
        return c.embedding.dimension
    shape = {o.name: o.shape for o in served.model.session.get_outputs()}[c.outputs.embedding]
    if not isinstance(shape[-1], int):
        raise InvalidGalleryRequest(f"model {served.ref}: its embedding output has no fixed length, so no gallery "
                                    "can be bound to it")
    return shape[-1]


def bound_model(worker: Worker, gallery: Gallery, expected: str) -> str:
    """``name:version`` of the model the gallery's vectors came from, once it is known to be
    loaded and to be what the caller ``expected`` (if anything); GalleryConflict otherwise."""
    ref = f"{gallery.model}:{gallery.version}"
    if expected:
        name, _, version = expected.partition(":")
        if name != gallery.model or (version and version != gallery.version):
            raise GalleryConflict(f"gallery {gallery.name!r} holds embeddings of {ref}; {expected} makes other "
                                  "vectors, which cannot be compared with them: use a gallery bound to that model")
    try:
        worker.repo.lookup(gallery.model, gallery.version)
    except ModelNotFound:
        loaded = sorted(worker.repo.models.get(gallery.model, {}))
        raise GalleryConflict(f"gallery {gallery.name!r} holds embeddings of {ref}, which is not loaded (loaded "
                              f"versions of {gallery.model!r}: {loaded or 'none'}); another version's vectors cannot "
                              "be compared with them: create a gallery for it and add the images again") from None
    return ref


def _one_image(upload: Upload) -> None:
    if upload.video is not None:
        raise UploadError(422, "invalid_parameter", "a gallery takes images, not videos")
    if len(upload.images) != 1:
        raise UploadError(422, "invalid_parameter", f"send exactly one image; this request has {len(upload.images)}")


def _metadata(text: str, limit: int) -> dict[str, Any]:
    if len(text.encode()) > 4 * limit:  # a bound before parsing; compact JSON is checked below
        raise InvalidOption("metadata", f"at most {limit} bytes of JSON")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidOption("metadata", "not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidOption("metadata", "must be a JSON object")
    if len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()) > limit:
        raise InvalidOption("metadata", f"at most {limit} bytes of JSON (CONVSERVE_GALLERY_MAX_METADATA_BYTES)")
    return value


async def _embed(worker: Worker, gallery: Gallery, upload: Upload, expected: str) -> tuple[list[float], dict]:
    """The upload's embedding by the gallery's model (through /embed's pipeline) and its timing."""
    upload.options = {"model": bound_model(worker, gallery, expected)}
    body, served = await worker.pipeline.answer(EMBED, upload)
    if len(body["embedding"]) != gallery.dimension:  # a file replaced under the same version
        raise GalleryConflict(f"gallery {gallery.name!r} holds {gallery.dimension}-dimensional vectors; "
                              f"{served.ref} now makes {len(body['embedding'])}")
    return body["embedding"], body["timing"]


# --- handlers -------------------------------------------------------------------------------

async def list_galleries(worker: Worker, call: Call) -> Answer:
    parse_options((), call.query, "/galleries")
    galleries = await worker.pipeline.in_pool(_store(worker).galleries)
    return Answer(200, _json({"galleries": [describe(g) for g in galleries]}))


async def create_gallery(worker: Worker, call: Call) -> Answer:
    body = await read_body(call.headers, call.receive, worker.limits, call.ticket.grow)
    if len(body) > MAX_CREATE_BYTES:
        raise UploadError(413, "payload_too_large", f"a gallery is created with at most {MAX_CREATE_BYTES} bytes")
    try:
        doc = json.loads(body or b"null")
    except (ValueError, RecursionError):
        raise UploadError(400, "malformed_request", "the body is not JSON: send {\"name\": ..., \"model\": ...}") \
            from None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise InvalidOption("name", "send a JSON object with a string 'name' (and optionally 'model')")
    unknown = sorted(set(doc) - {"name", "model"})
    if unknown:
        raise InvalidOption(unknown[0], "unknown field; known: name, model")
    model = doc.get("model") or ""
    if not isinstance(model, str):
        raise InvalidOption("model", "must be a string: a model name or name:version")
    served = worker.repo.model_for(EMBED, model or None)
    store = _store(worker)
    gallery = await worker.pipeline.in_pool(store.create, doc["name"], served.model.name, served.model.version,
                                            embedding_dimension(served))
    return Answer(201, _json(describe(gallery)))


async def get_gallery(worker: Worker, call: Call) -> Answer:
    parse_options((), call.query, "/galleries/{name}")
    gallery = await worker.pipeline.in_pool(_store(worker).get, call.path_params["name"])
    return Answer(200, _json(describe(gallery)))


async def drop_gallery(worker: Worker, call: Call) -> Answer:
    parse_options((), call.query, "/galleries/{name}")
    name = call.path_params["name"]
    await worker.pipeline.in_pool(_store(worker).drop, name)
    return Answer(200, _json({"deleted": name}))


async def add_item(worker: Worker, call: Call) -> Answer:
    started = time.perf_counter()
    upload = await read_upload(call.headers, call.query, call.receive, worker.limits, call.ticket.grow)
    _one_image(upload)
    options = parse_options(ITEM_OPTIONS, upload.options, "/galleries/{name}/items")
    metadata = _metadata(options["metadata"], worker.settings.gallery_max_metadata_bytes)
    item_id = options["id"] or str(uuid.uuid4())
    store = _store(worker)
    gallery = await worker.pipeline.in_pool(store.get, call.path_params["name"])
    total = sum(g.count for g in await worker.pipeline.in_pool(store.galleries))
    if total >= worker.settings.gallery_max_items:
        raise GalleryConflict(f"the galleries hold {total} items, the most this server keeps "
                              "(CONVSERVE_GALLERY_MAX_ITEMS): remove items or galleries first")
    vector, timing = await _embed(worker, gallery, upload, options["model"])
    import numpy as np

    t0 = time.perf_counter()
    await worker.pipeline.in_pool(store.add, gallery.name, [(item_id, metadata, np.asarray(vector, np.float32))])
    count = (await worker.pipeline.in_pool(store.get, gallery.name)).count
    timing = {**timing, "store_ms": round((time.perf_counter() - t0) * 1e3, 3),
              "total_ms": round((time.perf_counter() - started) * 1e3, 3)}
    metrics.answered(f"{gallery.model}:{gallery.version}", "galleries_add", timing["total_ms"] / 1e3)
    return Answer(201, _json({"gallery": gallery.name, "id": item_id, "count": count,
                              "model": {"name": gallery.model, "version": gallery.version}, "timing": timing}))


async def list_items(worker: Worker, call: Call) -> Answer:
    options = parse_options(PAGE_OPTIONS, call.query, "/galleries/{name}/items")
    store = _store(worker)
    name = call.path_params["name"]
    gallery = await worker.pipeline.in_pool(store.get, name)
    items = await worker.pipeline.in_pool(store.items, name, options["offset"], options["limit"])
    return Answer(200, _json({"gallery": name, "count": gallery.count, "offset": options["offset"],
                              "limit": options["limit"],
                              "items": [{"id": i.item_id, "metadata": i.metadata, "added_at": round(i.added_at, 3)}
                                        for i in items]}))


async def remove_item(worker: Worker, call: Call) -> Answer:
    parse_options((), call.query, "/galleries/{name}/items/{item_id}")
    name, item_id = call.path_params["name"], call.path_params["item_id"]
    store = _store(worker)
    if not await worker.pipeline.in_pool(store.remove, name, [item_id]):
        raise ItemNotFound(f"gallery {name!r} holds no item {item_id[:200]!r}")
    return Answer(200, _json({"gallery": name, "removed": item_id}))


async def search(worker: Worker, call: Call) -> Answer:
    started = time.perf_counter()
    upload = await read_upload(call.headers, call.query, call.receive, worker.limits, call.ticket.grow)
    _one_image(upload)
    options = parse_options(SEARCH_OPTIONS, upload.options, "/galleries/{name}/search")
    store = _store(worker)
    gallery = await worker.pipeline.in_pool(store.get, call.path_params["name"])
    vector, timing = await _embed(worker, gallery, upload, options["model"])
    import numpy as np

    t0 = time.perf_counter()
    threshold = options["threshold"] if options["threshold"] > -1.0 else None
    hits = (await worker.pipeline.in_pool(store.search, gallery.name, np.asarray([vector], np.float32), options["k"],
                                          threshold))[0]
    timing = {**timing, "search_ms": round((time.perf_counter() - t0) * 1e3, 3),
              "total_ms": round((time.perf_counter() - started) * 1e3, 3)}
    metrics.answered(f"{gallery.model}:{gallery.version}", "galleries_search", timing["total_ms"] / 1e3)
    return Answer(200, _json({"gallery": gallery.name, "model": {"name": gallery.model, "version": gallery.version},
                              "matches": [{"id": h.item_id, "score": round(float(h.score), 6),
                                           "metadata": h.metadata} for h in hits],
                              "timing": timing}))


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
