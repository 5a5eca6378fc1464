"""Following one request: its request id in every answer and log line, and OpenTelemetry spans.

- **Request id.** :class:`RequestIdMiddleware` takes the client's ``X-Request-ID`` (printable
  ASCII, up to 128 characters) or the trace id of a W3C ``traceparent``, or makes one (32 hex
  digits), answers with it in ``X-Request-ID``, and keeps it in a context variable that
  :class:`RequestIdFilter` writes into every log record (``request_id``) emitted while the
  request is handled.
- **Logs.** ``CONVSERVE_LOG_FORMAT=json`` logs one JSON object a line (python-json-logger),
  with ``request_id`` when there is one; text otherwise.
- **Spans.** When OpenTelemetry export is configured (``CONVSERVE_OTLP_ENDPOINT``, see
  :func:`bentoml_tracing_config`), BentoML's tracer provider exports a span per request and
  convserve adds child spans for ``decode``, ``queue`` (waiting for a batch), ``inference``
  (the ONNX Runtime run), ``postprocess`` and ``render``; a gRPC call gets its own span
  (:func:`rpc_span`, in the caller's trace), the same children under it. Without export,
  :func:`span` costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.batching import BatchResult

HEADER = b"x-request-id"
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("convserve_request_id", default=None)
_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def enabled() -> bool:
    """Whether spans are exported (CONVSERVE_OTLP_ENDPOINT, or CONVSERVE_TRACE_REQUESTS=1 with
    BentoML's own tracing configuration)."""
    return bool(os.environ.get("CONVSERVE_OTLP_ENDPOINT")) or os.environ.get("CONVSERVE_TRACE_REQUESTS") == "1"


def bentoml_tracing_config(excluded: list[str]) -> dict[str, Any]:
    """The ``tracing`` settings for ``@bentoml.service``: OTLP over HTTP to
    CONVSERVE_OTLP_ENDPOINT (e.g. http://collector:4318/v1/traces) at
    CONVSERVE_TRACE_SAMPLE_RATE (default 1.0) when set; otherwise ``excluded`` routes skip
    BentoML's per-request span (about 0.3 ms of CPU each) unless CONVSERVE_TRACE_REQUESTS=1."""
    endpoint = os.environ.get("CONVSERVE_OTLP_ENDPOINT")
    if endpoint:
        rate = float(os.environ.get("CONVSERVE_TRACE_SAMPLE_RATE") or 1.0)
        return {"exporter_type": "otlp", "sample_rate": rate, "excluded_urls": ["/livez", "/readyz", "/metrics"],
                "otlp": {"protocol": "http", "endpoint": endpoint, "http": {}}}
    return {"excluded_urls": [] if enabled() else excluded}


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The id for a request with these (raw ASGI) headers; see the module docstring."""
    traceparent = None
    for name, value in headers:
        if name == HEADER:
            text = value.decode("latin-1").strip()
            if _VALID_ID.match(text):
                return text
        elif name == b"traceparent":
            traceparent = value.decode("latin-1").strip().lower()
    if traceparent:
        m = _TRACEPARENT.match(traceparent)
        if m and m.group(1) != "0" * 32:
            return m.group(1)
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: a request id for every HTTP request, in the context and the answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope["headers"])
        token = REQUEST_ID.set(rid)
        raw = rid.encode("latin-1")

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, raw)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's, or "-") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


# What must not reach a log line as it is: C0 controls (LF and CR end a line, ESC steers a
# terminal), DEL, C1 controls (U+0085 ends a line too) and the Unicode line and paragraph
# separators. Together they are every character str.splitlines breaks at, plus the rest of
# the controls. A client puts them in a request path as %0A, %0D, %C2%85, %E2%80%A8, ...
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_PLAIN = logging.Formatter()


def _escape_one(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str) -> str:
    """``text`` with each character of _UNSAFE written as an escape (``\\n``, ``\\r``,
    ``\\t``, ``\\xNN``, ``\\uNNNN``): it stays on one line, and shows what was sent.
    Backslashes are left alone, so escaping twice changes nothing."""
    return _UNSAFE.sub(_escape_one, text)


def _continuation(text: str) -> str:
    """A traceback or stack for the lines after a record's message: its lines kept, each
    escaped and indented, so none can pass for a record of its own (an exception's message
    may quote a request path)."""
    return "\n".join("  " + escape_controls(line) for line in text.split("\n"))


class OneLineFilter(logging.Filter):
    """Makes a record safe to write whatever a client sent: its message escaped
    (:func:`escape_controls`) and formatted once (``msg``, ``args`` None), its traceback and
    stack indented (:func:`_continuation`). On every handler (:func:`protect_log_handlers`),
    for text and JSON alike: the JSON formatter escapes line breaks by itself, but the message
    reads the same in both. Idempotent: a record passed through one handler is marked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_convserve_one_line", False):
            return True
        if not isinstance(record.msg, dict):  # python-json-logger merges a dict into the JSON object
            try:
                record.msg, record.args = escape_controls(record.getMessage()), None
            except Exception:  # bad arguments: the formatter reports it (handleError), not the caller
                return True
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _continuation(record.exc_text)
        if record.stack_info:
            record.stack_info = _continuation(record.stack_info)
        record._convserve_one_line = True  # "_": python-json-logger writes no such attribute out
        return True


_ONE_LINE = OneLineFilter()


def protect_log_handlers() -> None:
    """Put :class:`OneLineFilter` on every handler configured in this process: the root
    logger's and every named logger's (BentoML's ``bentoml`` handler, which ``bentoml.access``
    writes through; ``uvicorn.error``; ``circus``; convserve's). A worker's logging is
    configured by BentoML before the service is built, so calling this from there covers it."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            handler.addFilter(_ONE_LINE)  # once: addFilter skips a filter already there


def log_handler() -> logging.Handler:
    """A stderr handler: JSON lines with CONVSERVE_LOG_FORMAT=json, text otherwise; both
    carry the request id, and neither lets a client's text start a line
    (:class:`OneLineFilter`). Also protects the process's other handlers
    (:func:`protect_log_handlers`): the service calls this once, when it is built."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.addFilter(_ONE_LINE)
    protect_log_handlers()
    if os.environ.get("CONVSERVE_LOG_FORMAT", "").lower() == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
                                           rename_fields={"levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] [%(request_id)s] %(message)s"))
    return handler


# --- spans ---------------------------------------------------------------------------------

_tracer: Any = None


def _get_tracer() -> Any:
    """A tracer of BentoML's tracer provider (the one its exporter is attached to; BentoML
    does not make it OpenTelemetry's global provider): a private API, guarded with the
    other workarounds (``tracer-provider`` in service.bentoml_patches)."""
    global _tracer
    if _tracer is None:
        from service.bentoml_patches import tracer_provider

        _tracer = tracer_provider().get_tracer("convserve")
    return _tracer


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A child span of the current request (no-op unless spans are exported)."""
    if not _ENABLED:
        yield
        return
    with _get_tracer().start_as_current_span(name, attributes={f"convserve.{k}": v for k, v in attributes.items()}):
        yield


@contextlib.contextmanager
def rpc_span(name: str, metadata: list[tuple[str, str]], **attributes: Any) -> Iterator[None]:
    """The span of one gRPC call (BentoML makes the HTTP requests' spans; nothing makes these),
    in the trace of the ``traceparent`` in its metadata when there is one; the work's spans
    nest under it. No-op unless spans are exported."""
    if not _ENABLED:
        yield
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({k: v for k, v in metadata if k == "traceparent"})
    with _get_tracer().start_as_current_span(name, context=parent,
                                             attributes={f"convserve.{k}": v for k, v in attributes.items()}):
        yield


def interval(name: str, start: float, end: float, **attributes: Any) -> None:
    """A finished child span from perf_counter stamps (work timed elsewhere, e.g. in a thread)."""
    if not _ENABLED:
        return
    offset = time.time_ns() - int(time.perf_counter() * 1e9)  # perf_counter -> wall clock, ns
    s = _get_tracer().start_span(name, start_time=offset + int(start * 1e9),
                                 attributes={f"convserve.{k}": v for k, v in attributes.items()})
    s.end(end_time=offset + int(max(end, start) * 1e9))


def batch_spans(batched: list[BatchResult], submitted: float, done: float) -> None:
    """``queue`` and ``inference`` spans for a request's images, from the batcher's stamps
    (perf_counter seconds): queued at ``submitted``, run from the first batch's start to ``done``."""
    if not _ENABLED or not batched:
        return
    started = min(b.started for b in batched)
    interval("queue", submitted, started)
    interval("inference", started, done, batch_size=max(b.batch_size for b in batched))


_ENABLED = enabled()
