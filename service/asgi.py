"""The raw ASGI request path of convserve's own routes: admission, a typed answer, errors.

The inference routes are plain ASGI handlers: they read their own bodies (service.uploads),
after admission control (service.admission) has had its say. They are registered as FastAPI
routes only for their OpenAPI description (which BentoML merges into /docs.json); serving
them skips FastAPI's per-request machinery (:class:`RawRoute`), which with BentoML's stack
around it made the event loop, and the GIL it holds, the bottleneck of a worker.

:func:`serve_admitted` is the path every admitted request takes: admit, run the handler (a
:data:`Handler` gets the :class:`~service.worker.Worker` and the :class:`Call`, and returns
an :class:`Answer`), map any failure to an error answer, linger over an unread body before a
413, send, log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from service import metrics
from service.admission import Ticket
from service.errors import V2Error, client_error, error_json, send_response
from service.uploads import TrackedReceive, discard_body
from service.worker import Worker, worker_of

log = logging.getLogger("convserve.app")
access = logging.getLogger("convserve.access")

Headers = list[tuple[bytes, bytes]]
LINGER_BYTES = 8 * 1024 * 1024  # body bytes read and dropped before a 413, so the client reads the answer
# Refusals that close the connection: the rest of the body is not worth reading.
CLOSING_STATUSES = (401, 408, 413, 503)


class Stream(Protocol):
    """A response body sent as it is made (service.video): its chunks, and what ends it."""

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


@dataclass
class Answer:
    """A response: status, body, content type and extra headers; or, with ``stream``, a body
    sent chunk by chunk (``body`` unused)."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: Headers = field(default_factory=list)
    stream: Stream | None = None


@dataclass(frozen=True)
class Call:
    """One admitted request as a handler sees it: its scope, headers (lower-case names),
    query options, the body's ``receive`` and the admission ticket its body bytes grow."""

    scope: Scope
    headers: dict[str, str]
    query: dict[str, str]
    receive: TrackedReceive
    ticket: Ticket

    @property
    def path_params(self) -> dict[str, str]:
        return self.scope.get("path_params", {})


Handler = Callable[[Worker, Call], Awaitable[Answer]]


def header_dict(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the last of repeated ones)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def query_dict(raw: bytes) -> dict[str, str]:
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}


def _declared_length(headers: dict[str, str]) -> int | None:
    length = headers.get("content-length", "")
    return int(length) if length.isascii() and length.isdigit() else None


async def serve_admitted(scope: Scope, receive: Receive, send: Send, route: str, handle: Handler,
                         v2_errors: bool = False) -> None:
    """Admit the request, run ``handle``, answer its failures in the error shape (v2's under
    /v2), and free the admission slot whatever happens."""
    worker = worker_of(scope["app"])
    headers = header_dict(scope)
    tracked = TrackedReceive(receive)
    started = time.perf_counter()
    declared = _declared_length(headers)
    ticket: Ticket | None = None
    gone: list[bool] = []
    streamed: list[bool] = []
    try:
        ticket = await worker.admission.admit(declared)
        _publish(worker)
        call = Call(scope, headers, query_dict(scope["query_string"]), tracked, ticket)
        handler = asyncio.ensure_future(_answer_or_stream(handle(worker, call), send, worker, streamed))
        watcher = asyncio.ensure_future(_cancel_when_gone(tracked, handler, gone))
        try:
            answer = await handler
        except asyncio.CancelledError:
            if not gone:  # the server itself is stopping this request: not ours to answer
                raise
            answer = Answer(CLIENT_GONE, error_json("client_closed", "the client went away", v2=v2_errors))
            metrics.error(route, "client_closed")
        finally:
            watcher.cancel()
        if worker.balancer is not None and worker.balancer.should_close(worker.admission.requests):
            answer.headers.append((b"connection", b"close"))  # the client reconnects, maybe to another worker
            metrics.rebalanced()
    except Exception as exc:
        # A refusal at admission (503) closes the connection without reading the body. Tried and
        # measured: reading small bodies and keeping the connection let clients retry at once on
        # it, and under 4x overload the event-loop-bound classifier then spent itself on refusals
        # (goodput 0.27 of the sustained rate, against 0.81 when refused connections close: the
        # clients' reconnections then wait in the kernel's listen backlog, at no cost to us).
        answer, type_ = failure_answer(exc, route, v2_errors)
        metrics.error(route, type_)
    finally:
        if ticket is not None:
            ticket.release()
            _publish(worker)
    if streamed:  # sent already, whole or cut short
        answer.status = CLIENT_GONE if gone else 200
    else:
        # Refused by its declared length while the body still arrives: read a bounded amount so the
        # client reads the answer (a chunked body over the limit is cut off at once).
        if answer.status == 413 and ticket is not None and declared is not None and declared <= LINGER_BYTES:
            await _linger(tracked, answer)
        await send_response(send, answer.status, answer.body, answer.content_type, answer.headers)
    if worker.settings.access_log:
        access.info("%s %s %d %.1f ms %d bytes", scope["method"], scope["path"], answer.status,
                    (time.perf_counter() - started) * 1e3, len(answer.body))


async def _answer_or_stream(answering: Awaitable[Answer], send: Send, worker: Worker, streamed: list[bool]) -> Answer:
    """The handler's answer; a streamed one is sent here, inside the request's task, so that a
    client going away (:func:`_cancel_when_gone`) stops it. A client that reads nothing for
    CONVSERVE_BODY_TIMEOUT_S loses the connection (the stream ends without its last chunk)."""
    answer = await answering
    if answer.stream is None:
        return answer
    stream = answer.stream
    timeout = worker.settings.body_timeout_s
    try:
        streamed.append(True)
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [(b"content-type", answer.content_type), *answer.headers]})
        async for chunk in stream.chunks():
            await asyncio.wait_for(send({"type": "http.response.body", "body": chunk, "more_body": True}), timeout)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except TimeoutError:
        log.info("a streamed answer was cut: its client read nothing for %d s", timeout)
    finally:
        await stream.close()
    return answer


CLIENT_GONE = 499  # nginx's status for a client that closed its connection before the answer


async def _cancel_when_gone(tracked: TrackedReceive, handler: asyncio.Future, gone: list[bool]) -> None:
    """Once the body is read, wait for the connection's next event: a disconnect before the
    answer cancels ``handler``, so the request's queued images are dropped unrun
    (service.batching) instead of computed for nobody."""
    await tracked.read.wait()
    message = await tracked.receive()
    if message["type"] == "http.disconnect" and not handler.done():
        gone.append(True)
        handler.cancel()


def _publish(worker: Worker) -> None:
    metrics.requests_in_flight(worker.admission.requests)  # the autoscaling signal (service.metrics)
    if worker.balancer is not None:
        worker.balancer.publish(worker.admission.requests)


async def _linger(receive: TrackedReceive, answer: Answer) -> None:
    """Drop what is left of the body (bounded) before a 413: uvicorn closes the connection as
    soon as a ``Connection: close`` answer is sent, and the client would see a broken pipe."""
    await discard_body(receive, LINGER_BYTES)
    if not receive.ended and not any(k == b"connection" for k, _ in answer.headers):
        answer.headers.append((b"connection", b"close"))  # the body did not end in time: this connection is done


def failure_answer(exc: Exception, route: str, v2_shape: bool) -> tuple[Answer, str]:
    """The error answer for a failed request and its error type; refusals close the connection."""
    if isinstance(exc, V2Error):
        status, type_, message, headers = exc.status, "invalid_request", exc.message, exc.headers
    else:
        known = client_error(exc)
        if known is None:
            log.exception("/%s failed", route)
            status, type_, message, headers = (500, "internal",
                                               "the model failed on this input; the server log has details", {})
        else:
            status, type_, message, headers = known
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if status in CLOSING_STATUSES and not any(k == b"connection" for k, _ in extra):
        extra.append((b"connection", b"close"))
    return Answer(status, error_json(type_, message, v2=v2_shape), b"application/json", extra), type_


RawHandler = Callable[[Scope, Receive, Send], Awaitable[None]]


class RawRoute(APIRoute):
    """An APIRoute for the OpenAPI document whose requests a raw ASGI handler serves."""

    raw: RawHandler

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self.methods:
            await self.raw(scope, receive, send)
        else:  # Starlette's 405 (the error middleware gives it the JSON shape)
            await super().handle(scope, receive, send)


def add_raw_route(router: Any, path: str, raw: RawHandler, methods: list[str], **documentation: Any) -> None:
    """Register ``raw`` for ``path`` on a FastAPI ``router``, documented by ``documentation``
    (APIRoute's keyword arguments; ``endpoint`` only describes the request body)."""
    documentation.setdefault("endpoint", _undocumented)
    router.add_api_route(path, methods=methods, route_class_override=RawRoute, **documentation)
    router.routes[-1].raw = raw


async def _undocumented() -> Any:  # documentation only: RawRoute serves
    raise NotImplementedError
