"""Every workaround convserve needs in BentoML 1.4.39 (pinned) and the uvicorn it runs, in one table.

Each :class:`Workaround` in :data:`WORKAROUNDS` says what it changes, why (measured), the
upstream issue where there is one, and carries a guard: :func:`check` raises RuntimeError
naming the entry when BentoML is not :data:`PINNED`, or when what an entry relies on is no
longer there in the shape it was written against (an attribute, a line of the upstream source),
so an upgrade cannot silently drop a fix. :func:`apply_all` checks, then applies every entry;
service.service calls it once, at import, in ``bentoml serve``'s supervisor and in every worker
(each entry matters in one of them; all are cheap and idempotent), and ``python -m
service.check`` (the start-up check) runs :func:`check` as well.

Upgrading BentoML: change PINNED, run tests/service/test_bentoml_patches.py and
tests/service/test_request_heads.py, re-read each guard against the new source, and drop the
entries upstream has fixed. uvicorn is not pinned (pyproject: ``uvicorn>=0.29``); the uvicorn
entry is guarded by shape only (checked with uvicorn 0.54.0 and httptools 0.9.0).

Not here: service.app's RawRoute (a FastAPI route class, not a patch of anyone's code).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import error_json

PINNED = "1.4.39"
UVICORN_CHECKED = "0.54.0"  # documentation only: the uvicorn the head limits were measured with

log = logging.getLogger("convserve.http")


@dataclass(frozen=True)
class Workaround:
    """One workaround: ``guard`` returns what is wrong (None when all is as expected);
    ``apply`` installs it (None: nothing to install, e.g. a private API we only call);
    ``in_effect`` says whether it is installed in this process."""

    name: str
    reason: str
    upstream: str | None
    guard: Callable[[], str | None]
    apply: Callable[[], None] | None = None
    in_effect: Callable[[], bool] | None = None


def _source_lacks(obj: Any, *needles: str) -> str | None:
    """The first line of ``needles`` that ``obj``'s source does not contain, as a complaint."""
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return f"the source of {getattr(obj, '__qualname__', obj)!r} cannot be read"
    for needle in needles:
        if needle not in source:
            return f"{obj.__module__}.{obj.__qualname__} no longer contains {needle!r}"
    return None


def _module_lacks(module: str, *needles: str) -> str | None:
    """Like :func:`_source_lacks` for a whole module, read without importing it (importing
    _bentoml_impl.server.app loads NumPy, which bentoml serve's supervisor must not)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return f"module {module} is gone"
    source = Path(spec.origin).read_text()
    for needle in needles:
        if needle not in source:
            return f"{module} no longer contains {needle!r}"
    return None


def _original(cls: type, name: str) -> Any:
    """``cls.name`` as upstream wrote it (patched methods keep it in ``__wrapped_original__``)."""
    attr = cls.__dict__.get(name)
    return getattr(attr, "__wrapped_original__", attr)


# --- 1. TimeoutMiddleware's timer -------------------------------------------------------------

TIMEOUT_REASON = """\
bentoml._internal.server.http.traffic.TimeoutMiddleware schedules loop.call_later(timeout, ...)
for every request and never cancels it. Each timer keeps its future and a copy of the request's
context (with its OpenTelemetry span) alive for the whole timeout (120 s here): at 150 req/s that
is 18,000 requests' worth of objects, memory grows with load and full garbage collections (which
walk them all) stop the event loop for 70-130 ms every few seconds. That pause was most of the
service's p99 at one client (measured: a trivial route's p99 went from 77 ms to 0.9 ms with the
timer cancelled). The patch is the same __call__ plus handle.cancel() when the request is done."""


async def _timeout_call(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """TimeoutMiddleware.__call__ of BentoML 1.4.39, with its timer cancelled at the end."""
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    handle = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message: dict[str, Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        try:
            await waiter
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError since Python 3.11
            if fut.cancel():
                resp = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                    status_code=504)
                await resp(scope, receive, send)
        else:
            await fut
    finally:
        handle.cancel()


def _timeout_guard() -> str | None:
    from bentoml._internal.server.http import traffic

    cls = getattr(traffic, "TimeoutMiddleware", None)
    if cls is None or not callable(getattr(cls, "_set_timer_out", None)):
        return "bentoml._internal.server.http.traffic.TimeoutMiddleware._set_timer_out is gone"
    return _source_lacks(_original(cls, "__call__"), "loop.call_later(self.timeout, self._set_timer_out, waiter)",
                         "self.app(scope, receive, _send)")


def _replace_call(cls: type, ours: Callable[..., Any]) -> None:
    """``cls.__call__ = ours`` once (idempotent), keeping the original on ``ours`` for the guard."""
    if cls.__call__ is not ours:  # type: ignore[operator]
        ours.__wrapped_original__ = cls.__call__  # type: ignore[attr-defined,operator]
        cls.__call__ = ours  # type: ignore[method-assign,assignment,operator]


def _timeout_apply() -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    _replace_call(TimeoutMiddleware, _timeout_call)


def _timeout_in_effect() -> bool:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    return TimeoutMiddleware.__call__ is _timeout_call


# --- 2. respawn dead workers inside containers too ---------------------------------------------

RESPAWN_REASON = """\
BentoML's supervisor restarts a dead worker, except inside a container (BENTOML_CONTAINERIZED,
set in every image BentoML builds), where it expects the container to be restarted instead; but
a supervisor with no worker left neither serves nor exits, so the container never restarts
either. bentoml.serving.create_watcher asks running_inside_container() for that decision only
(respawn=not running_inside_container()), and nothing else asks it: answering False makes the
supervisor restart dead workers everywhere (measured: serving again within seconds of a
kill -9, the time to load and warm up). Matters in bentoml serve's main process."""


def _never_inside_container() -> bool:
    """bentoml.serving.running_inside_container, patched: see RESPAWN_REASON."""
    return False


def _respawn_guard() -> str | None:
    import bentoml.serving as serving

    if not callable(getattr(serving, "running_inside_container", None)):
        return "bentoml.serving.running_inside_container is gone"
    return _source_lacks(serving.create_watcher, "respawn=not running_inside_container()")


def _respawn_apply() -> None:
    import bentoml.serving as serving

    serving.running_inside_container = _never_inside_container


def _respawn_in_effect() -> bool:
    import bentoml.serving as serving

    return serving.running_inside_container is _never_inside_container


# --- 3. BentoML's tracer provider (a private API we call) -------------------------------------

TRACER_REASON = """\
convserve's child spans (decode, queue, inference, ...) must come from the tracer provider
BentoML's OpenTelemetry middleware and exporter use, so that they share its trace and are
exported with it; BentoML does not make that provider OpenTelemetry's global one, and exposes it
only as the private BentoMLContainer.tracer_provider. service.tracing gets it through
tracer_provider() here."""


def tracer_provider() -> Any:
    """BentoML's OpenTelemetry tracer provider (see TRACER_REASON)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.tracer_provider.get()


def _tracer_guard() -> str | None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    if not callable(getattr(getattr(BentoMLContainer, "tracer_provider", None), "get", None)):
        return "BentoMLContainer.tracer_provider.get is gone"
    return _module_lacks("_bentoml_impl.server.app", "tracer_provider=BentoMLContainer.tracer_provider.get()")


# --- 4. the container image's distro ----------------------------------------------------------

IMAGE_DISTRO = "debian-wheels-only"
DISTRO_REASON = """\
BentoML's default image runs `apt-get install build-essential git ...` (512 MB here) before
installing the Python packages; every dependency of convserve is a wheel, so the image needs none
of it. bentoml.images.Image inserts that command only for the distros it knows
(Image.__attrs_post_init__: `if self.distro in CONTAINER_METADATA`), so service.service's IMAGE
names IMAGE_DISTRO, a distro BentoML does not know, with an explicit base image: no apt step, the
base image and Python packages as BentoML would pick them."""


def _distro_guard() -> str | None:
    from _bentoml_sdk.images import Image
    from bentoml._internal.container.frontend.dockerfile import CONTAINER_METADATA

    if IMAGE_DISTRO in CONTAINER_METADATA:
        return f"BentoML now knows the distro {IMAGE_DISTRO!r}: its apt step would run again"
    commands = Image(base_image="python:3.11-slim", distro=IMAGE_DISTRO, python_version="3.11").commands
    if commands:
        return f"an Image of distro {IMAGE_DISTRO!r} now starts with commands {commands!r}"
    return None


# --- 5. request metrics labelled by route, not by raw path -------------------------------------

METRICS_REASON = """\
BentoML's RunnerTrafficMetricsMiddleware labels bentoml_service_request_total,
_request_duration_seconds and _request_in_progress with the raw request path (endpoint =
scope["path"]), so every distinct path a client sends makes new series in every worker's
Prometheus multiprocess files: 20,000 unauthenticated GETs to distinct unknown paths grew RSS
from 305 to 1,011 MB and /metrics from 348 KB to 85 MB (19.9 s per scrape). The patch labels a
request with the template of the route that answers it (/v2/models/{name}/infer), a mount's
prefix for static files (/playground/{path}), and UNMATCHED for every path no route knows."""

UNMATCHED = "/{unmatched}"
_REAL_PATH = "convserve.real_path"
# Matching a path against every route costs 40-85 us (measured: /v2/models/x/infer 84 us, an
# unknown path 43 us), so the labels of known paths are remembered: 4096 paths of at most 256
# characters a worker (about 1 MB), emptied when full. Unknown paths are not remembered, so a
# flood of them costs no memory and evicts nothing.
_LABEL_CACHE_SIZE = 4096
_CACHED_PATH_CHARS = 256


def route_label(scope: dict[str, Any]) -> str:
    """The metrics label for a request: its route's template, or UNMATCHED."""
    routes = getattr(scope.get("app"), "routes", None)
    return (_route_template(routes, scope, "") if routes else None) or UNMATCHED


def _route_template(routes: list[Any], scope: dict[str, Any], prefix: str) -> str | None:
    """The first route matching ``scope`` (fully, or by path with another method), as a template;
    into mounted apps that have routes (FastAPI, Starlette)."""
    from starlette.routing import Match, Mount

    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):
            inner = getattr(route.app, "routes", None)
            if inner is None:  # e.g. StaticFiles: every path under the prefix is one series
                return f"{prefix}{route.path}/{{path}}"
            found = _route_template(inner, {**scope, **child}, prefix + route.path)
            if found:
                return found
            continue
        return prefix + getattr(route, "path", "")
    return None


class _RealPath:
    """Restores the request's path under the metrics middleware, which saw its label."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        real = scope.pop(_REAL_PATH, None)
        if real is not None:
            scope["path"] = real
        await self.app(scope, receive, send)


async def _metrics_call(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """RunnerTrafficMetricsMiddleware.__call__ with ``scope["path"]`` replaced by its route label
    for BentoML's code (which reads it once, as the label), and restored below it."""
    original = _metrics_call.__wrapped_original__  # type: ignore[attr-defined]
    if scope["type"] not in ("http", "websocket"):
        return await original(self, scope, receive, send)
    if not isinstance(self.app, _RealPath):
        self.app = _RealPath(self.app)
        self._convserve_labels = {}
    labels: dict[tuple[str, str], str] = self._convserve_labels
    key = (scope["type"], scope["path"])
    label = labels.get(key)
    if label is None:
        label = route_label(scope)
        if label != UNMATCHED and len(key[1]) <= _CACHED_PATH_CHARS:
            if len(labels) >= _LABEL_CACHE_SIZE:
                labels.clear()
            labels[key] = label
    if label != scope["path"]:
        scope = {**scope, "path": label, _REAL_PATH: scope["path"]}
    await original(self, scope, receive, send)


def _metrics_guard() -> str | None:
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    return (_module_lacks("_bentoml_impl.server.app", "RunnerTrafficMetricsMiddleware,",
                          "app.router.routes.append(PassiveMount(path, mount_app, name=name))")
            or _source_lacks(_original(RunnerTrafficMetricsMiddleware, "__call__"), 'endpoint = scope["path"]',
                             "await self.app(scope, wrapped_receive, wrapped_send)"))


def _metrics_apply() -> None:
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    _replace_call(RunnerTrafficMetricsMiddleware, _metrics_call)


def _metrics_in_effect() -> bool:
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    return RunnerTrafficMetricsMiddleware.__call__ is _metrics_call


# --- 6. bounded request heads (uvicorn) --------------------------------------------------------

HEADS_REASON = """\
BentoML 1.4.39 runs each worker with uvicorn.Config(app, timeout_keep_alive=5, ...) and no
`http=`, so uvicorn's "auto" protocol: HttpToolsProtocol, as httptools is installed. That
protocol has no limit on the size of a request head (httptools buffers it whole; uvicorn's
h11-only h11_max_incomplete_event_size does not apply) and no timeout for it (its keep-alive
timer is armed only after a response and cancelled by any byte). Measured: 10 connections each
sending 64 MiB of header lines held the worker at 982 MB RSS until the clients closed; 50
connections trickling one header byte a second for 60 s were never cut. The patch replaces the
auto protocol with BoundedHeadProtocol: CONVSERVE_MAX_HEAD_BYTES (request line and headers; 431
and close beyond it), CONVSERVE_HEAD_TIMEOUT_S (from the connection or the first byte of a head
to its end; close, with 408 if part of a head came), and uvicorn's keep-alive idle timeout from
CONVSERVE_KEEPALIVE_S."""
HEADS_UPSTREAM = "https://github.com/Kludex/uvicorn/issues/157 (limits and timeouts; httptools has no size limit)"


ONE_WRITE_REASON = """\
uvicorn writes a response's status line and headers (on http.response.start) and its body (on
http.response.body) with two transport writes, so two TCP segments. A worker killed between them
(kill -9, the OOM killer, a container stopped hard) leaves a client, or a load balancer that
cannot retry a response it has started to forward, with headers and no body: HAProxy's fleet
lost 1 request of about 4,000 that way while a replica was killed under load. Held until the
body's first write joins it (or the end of the event loop's turn), a small answer leaves in
one write: a kill then cuts all of it or none, and an empty answer is one HAProxy retries."""


class _OneWriteResponses:
    """A transport that holds a response head (a write that starts with "HTTP/" and ends the
    headers) until the next write joins it, or until the end of the event loop's turn."""

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop, self._held = transport, loop, b""

    def write(self, data: bytes) -> None:
        data, self._held = self._held + data, b""
        if data.startswith(b"HTTP/") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head (HEADS_REASON) whose
    responses leave in one write (ONE_WRITE_REASON). The limits are class attributes, set
    from the settings by the apply step."""

    max_head_bytes = 64 * 1024
    head_timeout_s = 10.0
    keepalive_s = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.keepalive_s
        self._awaiting_head = True  # from the connection, and after each message, to a head's end
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(_OneWriteResponses(transport, self.loop))
        self._arm()  # a connection that sends nothing is cut too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._awaiting_head:  # a body (its own timeout is the app's)
            super().data_received(data)
            return
        if self._head_timer is None:  # any byte after a message starts the next head's clock
            self._arm()
        room = self.max_head_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        self._head_bytes = self.max_head_bytes
        super().data_received(data[:room])  # the head may end within the limit
        if self.transport.is_closing():
            return
        if self._awaiting_head:
            self._refuse()
        else:
            super().data_received(data[room:])

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # Not armed here: an idle connection between requests is the keep-alive timer's.
        self._awaiting_head, self._head_bytes = True, 0
        super().on_message_complete()

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _busy(self) -> bool:
        """A response on this connection is still under way (the head is a pipelined one)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._busy():  # the server, not the client, is what is slow: wait again
            self._arm()
            return
        if self._head_bytes:  # nothing is written to a connection that sent nothing
            log.info("%s: request head not complete after %g s (%d bytes); 408 and closing",
                     _peer(self.client), self.head_timeout_s, self._head_bytes)
            self._write_error(408, b"Request Timeout", "request_timeout",
                              f"the request line and headers took longer than {self.head_timeout_s:g} s")
        self.transport.close()

    def _refuse(self) -> None:
        self._disarm()
        log.info("%s: request head over %d bytes; 431 and closing", _peer(self.client), self.max_head_bytes)
        if not self._busy():  # behind an unfinished response (pipelined) there is no place for an answer
            self._write_error(431, b"Request Header Fields Too Large", "header_too_large",
                              f"the request line and headers exceed {self.max_head_bytes} bytes")
        self.transport.close()

    def _write_error(self, status: int, phrase: bytes, type_: str, message: str) -> None:
        body = error_json(type_, message)
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, phrase, len(body), body))


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "client"


def _heads_guard() -> str | None:
    import uvicorn.config
    from uvicorn.protocols.http import auto

    if uvicorn.config.HTTP_PROTOCOLS.get("auto") != "uvicorn.protocols.http.auto:AutoHTTPProtocol":
        return "uvicorn's 'auto' HTTP protocol is no longer uvicorn.protocols.http.auto:AutoHTTPProtocol"
    if not issubclass(auto.AutoHTTPProtocol, HttpToolsProtocol):
        return f"uvicorn's auto protocol is {auto.AutoHTTPProtocol.__name__}, not HttpToolsProtocol"
    missing = [m for m in ("on_headers_complete", "on_message_complete", "on_response_complete", "connection_lost")
               if not callable(getattr(HttpToolsProtocol, m, None))]
    if missing:
        return f"HttpToolsProtocol has no {', '.join(missing)}"
    worker = _module_lacks("_bentoml_impl.worker.service", "config = uvicorn.Config(", "uvicorn.Server(config)")
    if worker:
        return worker
    if _module_lacks("_bentoml_impl.worker.service", "http=") is None:
        return "BentoML's worker now chooses uvicorn's HTTP protocol (http=...)"
    return (_source_lacks(uvicorn.config.Config.load, "import_from_string(HTTP_PROTOCOLS.get(self.http, self.http))")
            or _source_lacks(HttpToolsProtocol.__init__, "self.timeout_keep_alive = config.timeout_keep_alive",
                             "self.loop = ", "self.cycle: ")
            or _source_lacks(HttpToolsProtocol.data_received, "self._unset_keepalive_if_required()",
                             "self.parser.feed_data(data)")
            or _source_lacks(HttpToolsProtocol.on_response_complete,
                             "self.timeout_keep_alive, self.timeout_keep_alive_handler")
            or _source_lacks(HttpToolsProtocol.connection_made, "self.client = "))


def _heads_apply() -> None:
    from uvicorn.protocols.http import auto

    from core.errors import ConfigError
    from service.settings import Settings

    cls = BoundedHeadProtocol
    try:
        s = Settings.from_env()
    except ConfigError:  # the start-up check reports it and stops the server; the defaults meanwhile
        pass
    else:
        cls.max_head_bytes, cls.head_timeout_s, cls.keepalive_s = s.max_head_bytes, s.head_timeout_s, s.keepalive_s
    auto.AutoHTTPProtocol = cls


def _one_write_guard() -> str | None:
    """uvicorn still writes a response head with one write, then the body (BoundedHeadProtocol
    installs _OneWriteResponses, so nothing to apply here)."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    return _source_lacks(RequestResponseCycle.send, 'content.append(b"\\r\\n")',
                         'self.transport.write(b"".join(content))')


def _heads_in_effect() -> bool:
    from uvicorn.protocols.http import auto

    return auto.AutoHTTPProtocol is BoundedHeadProtocol


# --- the table ---------------------------------------------------------------------------------

WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround("timeout-timer", TIMEOUT_REASON, None, _timeout_guard, _timeout_apply, _timeout_in_effect),
    Workaround("respawn-in-containers", RESPAWN_REASON, None, _respawn_guard, _respawn_apply, _respawn_in_effect),
    Workaround("tracer-provider", TRACER_REASON, None, _tracer_guard),
    Workaround("image-distro", DISTRO_REASON, None, _distro_guard),
    Workaround("metrics-route-labels", METRICS_REASON, None, _metrics_guard, _metrics_apply, _metrics_in_effect),
    Workaround("bounded-request-heads", HEADS_REASON, HEADS_UPSTREAM, _heads_guard, _heads_apply, _heads_in_effect),
    Workaround("one-write-responses", ONE_WRITE_REASON, None, _one_write_guard, None, _heads_in_effect),
)


def check_version(installed: str | None = None) -> None:
    """RuntimeError unless the installed BentoML (``installed``, default: read from the
    package's metadata, without importing it) is PINNED."""
    from importlib.metadata import version

    installed = installed or version("bentoml")
    if installed != PINNED:
        raise RuntimeError(f"BentoML {installed} is installed but convserve's workarounds are for "
                           f"{PINNED} (service/bentoml_patches.py: re-check each one, then change PINNED)")


def check() -> None:
    """RuntimeError naming the first workaround whose guard fails (BentoML not PINNED first)."""
    import bentoml

    check_version(bentoml.__version__)
    for w in WORKAROUNDS:
        try:
            problem = w.guard()
        except (ImportError, AttributeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            raise RuntimeError(f"workaround {w.name!r} no longer fits the installed BentoML/uvicorn: {problem} "
                               "(service/bentoml_patches.py)")


def apply_all() -> None:
    """:func:`check`, then install every workaround in this process (idempotent)."""
    check()
    for w in WORKAROUNDS:
        if w.apply is not None:
            w.apply()
