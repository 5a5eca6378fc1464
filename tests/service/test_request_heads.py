"""Bounded request heads on a real server (service.bentoml_patches, ``bounded-request-heads``):
a head over CONVSERVE_MAX_HEAD_BYTES gets 431 and a closed connection, a head (or a silent
connection) slower than CONVSERVE_HEAD_TIMEOUT_S is cut, an idle keep-alive connection is closed
after CONVSERVE_KEEPALIVE_S; normal requests, and slow bodies, are untouched."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import psutil
import pytest

from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server

pytestmark = pytest.mark.slow  # every test talks to a server it starts

HEAD_TIMEOUT_S = 2.0
KEEPALIVE_S = 1.0
MAX_HEAD = 64 * 1024  # the default
MARGIN_S = 1.5


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("heads") / "serve.log"
    s = start_server(SHIPPED_MODELS, log, env={"CONVSERVE_DEVICE": "cpu",
                                               "CONVSERVE_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S),
                                               "CONVSERVE_KEEPALIVE_S": str(KEEPALIVE_S)})
    yield s
    stop_server(s.proc)


def _connect(srv: Server) -> socket.socket:
    u = urlparse(srv.url)
    return socket.create_connection((u.hostname, u.port), timeout=10)


def _read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _read_response(sock: socket.socket) -> bytes:
    """One response (head, then content-length bytes of body) from a keep-alive connection."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, body = raw.split(b"\r\n\r\n", 1)
    length = next(int(ln.split(b":")[1]) for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return raw


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _get(srv: Server, path: str, headers: bytes = b"") -> bytes:
    with _connect(srv) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n" % (path.encode(), headers))
        return _read_all(s)


def _worker_rss(srv: Server) -> int:
    return sum(p.memory_info().rss for p in psutil.Process(srv.proc.pid).children(recursive=True))


def test_a_head_just_under_the_limit_is_served(srv: Server) -> None:
    pad = b"X-Pad: " + b"a" * (MAX_HEAD - 200) + b"\r\n"
    assert _status(_get(srv, "/readyz", pad)) == 200


def test_a_head_over_the_limit_gets_431_at_once(srv: Server) -> None:
    head = b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n"  # no end of head
    with _connect(srv) as s:
        t = time.perf_counter()
        s.sendall(head)
        raw = _read_all(s)
        elapsed = time.perf_counter() - t
    assert _status(raw) == 431 and elapsed < HEAD_TIMEOUT_S / 2
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "header_too_large"
    assert _status(_get(srv, "/readyz")) == 200


def test_endless_heads_are_cut_without_holding_memory(srv: Server) -> None:
    """10 connections each trying to send 16 MiB of header lines: cut long before (measured
    without the limit: the worker held every byte until the clients closed)."""
    rss = _worker_rss(srv)
    cut: list[float] = []
    line = b"X-Filler: " + b"b" * 1000 + b"\r\n"

    def flood() -> None:
        with _connect(srv) as s:
            t = time.perf_counter()
            try:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
                for _ in range(16 * 1024 * 1024 // len(line)):
                    s.sendall(line)
            except OSError:  # reset or broken pipe: the server closed
                cut.append(time.perf_counter() - t)

    threads = [threading.Thread(target=flood) for _ in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(cut) == 10 and max(cut) < HEAD_TIMEOUT_S, cut
    assert _worker_rss(srv) - rss < 40 * 1024 * 1024  # 160 MiB offered
    assert _status(_get(srv, "/readyz")) == 200


def test_trickled_heads_and_silent_connections_are_cut_after_the_timeout(srv: Server) -> None:
    """Five connections trickling a header byte every 0.2 s, and five that send nothing: all
    closed between the head timeout and the timeout plus a margin; the trickled ones with a 408."""
    trickling = [_connect(srv) for _ in range(5)]
    silent = [_connect(srv) for _ in range(5)]
    start = time.perf_counter()
    for s in trickling:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    closed: dict[socket.socket, tuple[float, bytes]] = {}
    while len(closed) < 10 and time.perf_counter() - start < HEAD_TIMEOUT_S + MARGIN_S + 2:
        for s in trickling:
            if s not in closed:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass
        readable, _, _ = select.select([s for s in trickling + silent if s not in closed], [], [], 0.2)
        for s in readable:
            closed[s] = (time.perf_counter() - start, _read_all(s, 2))
    for s in trickling + silent:
        s.close()
    assert len(closed) == 10
    for s, (when, raw) in closed.items():
        assert HEAD_TIMEOUT_S - 0.2 < when < HEAD_TIMEOUT_S + MARGIN_S, when
        assert _status(raw) == (408 if s in trickling else 0)
    assert _status(_get(srv, "/readyz")) == 200


def test_an_idle_keep_alive_connection_is_closed(srv: Server) -> None:
    with _connect(srv) as s:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(_read_response(s)) == 200
        t = time.perf_counter()  # the keep-alive timer started a little before: the answer was on its way
        rest = _read_all(s, KEEPALIVE_S + MARGIN_S + 2)
        assert rest == b"" and KEEPALIVE_S - 0.3 < time.perf_counter() - t < KEEPALIVE_S + MARGIN_S


def test_keep_alive_requests_and_a_slow_body_are_not_cut(srv: Server) -> None:
    """The head timer stops at the end of each head: a body trickled for longer than the head
    timeout is read (its own limit is CONVSERVE_BODY_TIMEOUT_S), and a connection used again
    within the keep-alive time serves every request."""
    body = b"not an image" * 10
    with _connect(srv) as s:
        for _ in range(3):
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(_read_response(s)) == 200
            time.sleep(KEEPALIVE_S / 2)
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 10):  # ~3 s, over the 2 s head timeout
            s.sendall(body[i:i + 10])
            time.sleep(HEAD_TIMEOUT_S * 1.5 / (len(body) / 10))
        raw = _read_all(s)
    assert _status(raw) == 400, raw[:300]
