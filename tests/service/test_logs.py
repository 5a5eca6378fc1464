"""Logs that cannot be forged: whatever a client sends (a path with %0A, %0D, %E2%80%A8, ...)
stays on its log line, escaped, in BentoML's access line, convserve's access line and error
tracebacks alike, text and JSON (service.tracing.OneLineFilter)."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from service import tracing
from tests.support.http import request
from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server

KEY = "log-test-key-0123456789"
FORGED = "2026-12-01T19:50:0"  # every forged line below starts with this


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shipped models with API keys and convserve's access line on."""
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    srv = start_server(SHIPPED_MODELS, log, env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_API_KEYS": KEY,
                                                 "CONVSERVE_ACCESS_LOG": "1", "CONVSERVE_POLL_S": "0"})
    yield srv
    stop_server(srv.proc)


def _wait_for(srv: Server, text: str, timeout: float = 15.0) -> str:
    """The server's log once it holds ``text`` (the workers write it a moment after answering)."""
    deadline = time.time() + timeout
    while True:
        log = srv.log_text()
        if text in log or time.time() > deadline:
            return log
        time.sleep(0.2)


@pytest.mark.slow
def test_a_path_cannot_forge_a_log_line(logged_server: Server) -> None:
    url = logged_server.url
    # No key: refused, yet BentoML's access line names the path.
    status = request(url, "GET", "/x%0A2026-12-01T19:50:00+0000%20[INFO]%20FORGED")[0]
    assert status in (401, 404)
    # With a key: convserve's own access line (an inference route) names it too. (A model name
    # with a LF is no route at all; a CR, which starts the line over in a terminal, is one.)
    status = request(url, "POST", "/v2/models/m%0D2026-12-01T19:50:01+0000%20[INFO]%20FORGED/infer",
                     b"{}", {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})[0]
    assert status == 404
    # Unicode line separators and terminal escapes are escaped as well.
    request(url, "GET", "/y%E2%80%A82026-12-01T19:50:02+0000%20[INFO]%20FORGED%1B[2J%C2%85")
    log = _wait_for(logged_server, "\\u20282026-12-01T19:50:02")
    lines = log.splitlines()  # splits at \n, \r, U+2028, U+0085, ... like any log reader might
    assert not [ln for ln in lines if ln.startswith(FORGED)], log[-3000:]
    assert "/x\\n2026-12-01T19:50:00+0000 [INFO] FORGED" in log
    assert "/y\\u20282026-12-01T19:50:02+0000 [INFO] FORGED\\x1b[2J\\x85" in log
    ours = [ln for ln in lines if "[convserve.access]" in ln and "19:50:01" in ln]
    assert ours and "/v2/models/m\\r2026-12-01T19:50:01+0000 [INFO] FORGED/infer 404" in ours[0], log[-3000:]
    assert "\x1b" not in log


def test_escaping_keeps_a_record_on_one_line() -> None:
    assert tracing.escape_controls("a\nb\rc\td\x00e\x7ff\x9bg\u2028h\u2029i") == \
        "a\\nb\\rc\\td\\x00e\\x7ff\\x9bg\\u2028h\\u2029i"
    assert tracing.escape_controls("plain text, é, 日本, \\n as sent") == "plain text, é, 日本, \\n as sent"
    once = tracing.escape_controls("x\ny")
    assert tracing.escape_controls(once) == once  # a record through two handlers is escaped once


@pytest.fixture()
def handler_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """log_handler() without protecting this process's other handlers (pytest's own)."""
    monkeypatch.setattr(tracing, "protect_log_handlers", lambda: None)


def _emit(handler: logging.Handler, exc: bool = False) -> str:
    """What ``handler`` writes for one record whose message and exception quote a forged path."""
    out = io.StringIO()
    handler.setStream(out)  # type: ignore[attr-defined]
    logger = logging.Logger("convserve.test")
    logger.addHandler(handler)
    path = "/x\n2026-12-01T19:50:03+0000 [INFO] FORGED"
    if exc:
        try:
            raise ValueError(f"no such path {path}")
        except ValueError:
            logger.exception("GET %s failed", path)
    else:
        logger.info("GET %s", path)
    return out.getvalue()


def test_text_lines_and_tracebacks_cannot_be_forged(handler_only: None) -> None:
    text = _emit(tracing.log_handler(), exc=True)
    lines = text.splitlines()
    assert "GET /x\\n2026-12-01T19:50:03+0000 [INFO] FORGED failed" in lines[0]
    assert lines[1].startswith("  Traceback") and all(ln.startswith("  ") for ln in lines[1:]), text
    assert "  2026-12-01T19:50:03+0000 [INFO] FORGED" in lines  # the exception's own line break, indented


def test_json_lines_cannot_be_forged(handler_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_LOG_FORMAT", "json")
    text = _emit(tracing.log_handler(), exc=True)
    (line,) = text.splitlines()
    doc = json.loads(line)
    assert doc["message"] == "GET /x\\n2026-12-01T19:50:03+0000 [INFO] FORGED failed"
    assert "FORGED" in doc["exc_info"] and not any(k.startswith("_") for k in doc)
