"""service.bentoml_patches: every workaround in effect after apply_all, each guard failing loudly
when BentoML changes, and what two of them fix (the timeout timer, the metrics labels)."""

from __future__ import annotations

import asyncio
import http.client
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import bentoml
import pytest

from service import bentoml_patches
from tests.support.servers import ROOT, free_port

ONE_LINE_VERSION = "9.9.9"


# --- the table and its guard -------------------------------------------------------------------

def test_every_workaround_is_in_effect_after_apply_all() -> None:
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from uvicorn.protocols.http import auto

    bentoml_patches.apply_all()
    assert all(w.in_effect() for w in bentoml_patches.WORKAROUNDS if w.in_effect)
    assert TimeoutMiddleware.__call__ is bentoml_patches._timeout_call
    assert RunnerTrafficMetricsMiddleware.__call__ is bentoml_patches._metrics_call
    assert bentoml.serving.running_inside_container() is False
    assert auto.AutoHTTPProtocol.__name__ == "BoundedHeadProtocol"
    bentoml_patches.apply_all()  # idempotent: still ours, the original still remembered
    assert bentoml_patches._original(TimeoutMiddleware, "__call__") is not bentoml_patches._timeout_call


def test_every_workaround_says_why() -> None:
    names = [w.name for w in bentoml_patches.WORKAROUNDS]
    assert len(set(names)) == len(names)
    assert all(len(w.reason) > 100 for w in bentoml_patches.WORKAROUNDS)


def test_the_guard_refuses_another_bentoml_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bentoml, "__version__", "1.4.40")
    with pytest.raises(RuntimeError, match=r"BentoML 1\.4\.40 is installed .* for 1\.4\.39"):
        bentoml_patches.apply_all()


@pytest.mark.parametrize("name, target, attribute", [
    ("respawn-in-containers", "bentoml.serving", "running_inside_container"),
    ("timeout-timer", "bentoml._internal.server.http.traffic.TimeoutMiddleware", "_set_timer_out"),
    ("tracer-provider", "bentoml._internal.configuration.containers._BentoMLContainerClass", "tracer_provider"),
])
def test_the_guard_names_a_workaround_whose_target_is_gone(name: str, target: str, attribute: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(f"{target}.{attribute}")
    with pytest.raises(RuntimeError, match=f"workaround '{name}'"):
        bentoml_patches.check()


def test_the_guard_notices_a_changed_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn.config
    from bentoml._internal.container.frontend.dockerfile import CONTAINER_METADATA

    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto", "somewhere:Else")
    with pytest.raises(RuntimeError, match="'bounded-request-heads'"):
        bentoml_patches.check()
    monkeypatch.undo()
    monkeypatch.setitem(CONTAINER_METADATA, bentoml_patches.IMAGE_DISTRO, CONTAINER_METADATA["debian"])
    with pytest.raises(RuntimeError, match="'image-distro'.*apt step"):
        bentoml_patches.check()


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_the_start_up_check_stops_on_another_version_with_one_line() -> None:
    """service.check reads the version from the package's metadata (without importing BentoML)."""
    fake = ("import importlib.metadata as m\nreal = m.version\n"
            f"m.version = lambda name: {ONE_LINE_VERSION!r} if name == 'bentoml' else real(name)\n")
    r = _python(fake + "from service.check import main; main()")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"convserve: cannot start: BentoML {ONE_LINE_VERSION} is installed")


@pytest.mark.slow
def test_bentoml_serve_stops_on_another_version_with_one_line(tmp_path: Path) -> None:
    """The supervisor imports service.service, whose apply_all refuses: no traceback, no worker."""
    (tmp_path / "sitecustomize.py").write_text(f"import bentoml\nbentoml.__version__ = {ONE_LINE_VERSION!r}\n")
    pythonpath = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:ConvServe", "--host", "127.0.0.1",
                        "--port", str(free_port())], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": pythonpath, "BENTOML_HOME": str(tmp_path / "home"),
                            "BENTOML_DO_NOT_TRACK": "true"})
    assert r.returncode != 0
    out = (r.stdout + r.stderr).strip().splitlines()
    assert out[-1].startswith(f"convserve: cannot start: BentoML {ONE_LINE_VERSION} is installed"), out[-20:]
    assert "Traceback" not in r.stderr


# --- timeout-timer -----------------------------------------------------------------------------

async def _ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(middleware, n: int) -> tuple[int, int]:
    """Answer ``n`` requests; the timers the loop still holds afterwards, and the 200s sent."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    for _ in range(n):
        await middleware({"type": "http", "method": "GET", "path": "/"}, receive, send)
    loop = asyncio.get_running_loop()
    pending = sum(1 for h in loop._scheduled if not h.cancelled())  # type: ignore[attr-defined]
    return pending, sum(1 for m in sent if m.get("status") == 200)


def test_no_timer_outlives_its_request() -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    bentoml_patches.apply_all()
    pending, ok = asyncio.run(_serve(TimeoutMiddleware(_ok, timeout=120), 50))
    assert ok == 50 and pending == 0


def test_a_request_over_the_timeout_still_gets_504() -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    bentoml_patches.apply_all()

    async def slow(scope, receive, send) -> None:
        await asyncio.sleep(5)

    async def main() -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        await TimeoutMiddleware(slow, timeout=0.05)({"type": "http", "method": "GET", "path": "/"}, receive, send)
        return sent

    assert asyncio.run(main())[0]["status"] == 504


# --- metrics-route-labels ----------------------------------------------------------------------

def test_labels_are_route_templates() -> None:
    from service.service import ConvServe

    app = ConvServe.to_asgi(is_main=True)
    expected = {
        "/classify": "/classify", "/models": "/models", "/readyz": "/readyz", "/docs.json": "/docs.json",
        "/v2/health/ready": "/v2/health/ready", "/v2/models/abc": "/v2/models/{name}",
        "/v2/models/abc/infer": "/v2/models/{name}/infer",
        "/v2/models/abc/versions/7/infer": "/v2/models/{name}/versions/{version}/infer",
        "/playground/x.js": "/playground/{path}", "/wp-login.php": "/{unmatched}",
        "/classify/extra": "/{unmatched}", "/v2/models/a/b/c": "/{unmatched}",
    }
    for path, label in expected.items():
        for method in ("GET", "POST"):  # a known path with another method (405) keeps its route's label
            scope = {"type": "http", "path": path, "root_path": "", "method": method, "app": app, "headers": []}
            assert bentoml_patches.route_label(scope) == label, (method, path)


def _series(metrics: str, needle: str) -> list[str]:
    return [ln for ln in metrics.splitlines() if not ln.startswith("#") and needle in ln]


def test_unknown_paths_do_not_grow_the_metrics(server) -> None:
    """3,000 GETs to distinct unknown paths and 300 to v2 paths of unknown models, on one
    keep-alive connection: no series names any of them, and /metrics stays about its size."""
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)

    def get(path: str) -> tuple[int, bytes]:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()

    for i in range(20):  # the routes' own series exist before the first measurement
        get(f"/v2/models/warm{i}/ready")
        get(f"/warm-{i}")
    status, before = get("/metrics")
    assert status == 200
    t = time.perf_counter()
    for i in range(3000):
        assert get(f"/no-such-page-{i}")[0] == 404
    for i in range(300):
        assert get(f"/v2/models/no-such-model-{i}/ready")[0] == 404
    elapsed = time.perf_counter() - t
    status, after = get("/metrics")
    conn.close()
    text = after.decode()
    assert not _series(text, "no-such-") and not _series(text, "warm")
    unmatched = _series(text, 'bentoml_service_request_total{endpoint="/{unmatched}"')
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in unmatched) >= 3020
    assert _series(text, 'endpoint="/v2/models/{name}/ready"')
    assert len(after) < 1.2 * len(before) + 4096, (len(before), len(after), f"{elapsed:.1f} s for 3,300 requests")


# --- one-write-responses ------------------------------------------------------------------------

def test_a_response_head_leaves_with_its_body_in_one_write() -> None:
    """The head waits for the body's first write; alone (a body that never comes this turn of
    the loop) it is flushed at the end of the turn; other writes pass at once."""
    import asyncio

    from service.bentoml_patches import _OneWriteResponses

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def close(self) -> None:
            self.closed = True

        def get_extra_info(self, name: str) -> str:
            return "delegated"

    async def scenario() -> Recorder:
        real = Recorder()
        t = _OneWriteResponses(real, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"ok")
        assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # no body follows
        assert len(real.writes) == 1
        await asyncio.sleep(0)
        assert real.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"
        t.write(b"some body bytes")
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.close()  # a held head is flushed before the close
        assert real.writes[-2:] == [b"some body bytes", b"HTTP/1.1 200 OK\r\n\r\n"] and real.closed
        assert t.get_extra_info("peername") == "delegated"
        return real

    asyncio.run(scenario())
