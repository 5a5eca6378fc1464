"""Operating the real server: new model versions without a restart (hot add, hot remove, a
broken new version refused, the admin reload), graceful drain on SIGTERM, a killed worker
coming back, API keys on and off, request ids in answers and logs, and OpenTelemetry spans."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.http import MULTIPART, get, multipart_body, post, request
from tests.support.images import jpeg, scene
from tests.support.servers import free_port, start_server, stop_server

KEY, OTHER_KEY, ADMIN = "k-" + "a" * 30, "k-" + "b" * 30, "admin-" + "c" * 30


def _wait(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def _models(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, _, body = request(url, "GET", "/models", headers=headers or {})
    assert status == 200, body
    return body


def _versions(url: str, name: str, headers: dict[str, str] | None = None) -> list[str]:
    return [m["version"] for m in _models(url, headers)["models"] if m["name"] == name]


def _publish(repo: Path, name: str, version: str, source: Path | bytes) -> Path:
    """Write a version the way operators should: into a hidden folder, then one rename."""
    staging = repo / name / f".staging-{version}-{uuid.uuid4().hex[:6]}"
    staging.mkdir(parents=True)
    if isinstance(source, bytes):
        (staging / "model.onnx").write_bytes(source)
    else:
        shutil.copy(source, staging / "model.onnx")
    final = repo / name / version
    staging.rename(final)
    return final


@pytest.fixture()
def live_repo(tiny_repo, tmp_path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    return repo


# --- model repository changes while serving ---------------------------------------------------

def test_versions_come_and_go_without_a_restart(live_repo, tmp_path) -> None:
    srv = start_server(live_repo, tmp_path / "serve.log", env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_POLL_S": "0.5"})
    try:
        image = {"image": ("a.jpg", jpeg(scene(600).image))}
        assert post(srv.url + "/classify", image, {"model": "tiny-cls"})[2]["model"]["version"] == "1"
        _publish(live_repo, "tiny-cls", "2", live_repo / "tiny-cls" / "1" / "model.onnx")
        _wait(lambda: "2" in _versions(srv.url, "tiny-cls"), what="version 2 listed")
        listed = {m["version"]: m for m in _models(srv.url)["models"] if m["name"] == "tiny-cls"}
        assert listed["2"]["default_version"] and not listed["1"]["default_version"]
        status, _, body = post(srv.url + "/classify", image, {"model": "tiny-cls"})
        assert status == 200 and body["model"]["version"] == "2"  # the highest version answers by default
        assert post(srv.url + "/classify", image, {"model": "tiny-cls:1"})[2]["model"]["version"] == "1"

        # a broken new version is refused, named, and the others keep serving
        _publish(live_repo, "tiny-cls", "3", b"this is not an onnx file")
        broken = str(live_repo / "tiny-cls" / "3" / "model.onnx")
        errors = _wait(lambda: _models(srv.url)["errors"], what="the broken version reported")
        assert errors[0]["path"] == "tiny-cls/3/model.onnx" and "invalid model" in errors[0]["error"]
        assert "3" not in _versions(srv.url, "tiny-cls")
        assert post(srv.url + "/classify", image, {"model": "tiny-cls"})[2]["model"]["version"] == "2"
        assert broken in srv.log_text() and "refused tiny-cls:3" in srv.log_text()
        index = {(e["name"], e["version"]): e for e in request(srv.url, "POST", "/v2/repository/index")[2]}
        assert index[("tiny-cls", "3")]["state"] == "UNAVAILABLE" and index[("tiny-cls", "2")]["state"] == "READY"

        # removed versions stop being offered; the error of a removed file goes too
        shutil.rmtree(live_repo / "tiny-cls" / "3")
        shutil.rmtree(live_repo / "tiny-cls" / "2")
        _wait(lambda: _versions(srv.url, "tiny-cls") == ["1"] and not _models(srv.url)["errors"], what="2 and 3 gone")
        status, _, body = post(srv.url + "/classify", image, {"model": "tiny-cls:2"})
        assert status == 404 and body["error"]["type"] == "unknown_model"
        assert post(srv.url + "/classify", image, {"model": "tiny-cls"})[2]["model"]["version"] == "1"
        # a whole new model appears
        _publish(live_repo, "tiny-cls-copy", "1", live_repo / "tiny-cls" / "1" / "model.onnx")
        _wait(lambda: _versions(srv.url, "tiny-cls-copy") == ["1"], what="a new model listed")
        assert post(srv.url + "/classify", image, {"model": "tiny-cls-copy"})[0] == 200
    finally:
        stop_server(srv.proc)


# --- API keys and the admin reload -------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(tiny_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("keyed") / "repo"
    shutil.copytree(tiny_repo, repo)
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key a line\n{OTHER_KEY}\n")
    srv = start_server(repo, tmp_path_factory.mktemp("keyed-log") / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_POLL_S": "0", "CONVSERVE_API_KEYS": KEY,
                            "CONVSERVE_API_KEYS_FILE": str(keys), "CONVSERVE_ADMIN_KEYS": ADMIN})
    srv.repo = repo
    yield srv
    stop_server(srv.proc)


def _classify(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    body = jpeg(scene(610).image)
    return request(url, "POST", "/classify", body, {"Content-Type": "image/jpeg", **headers})


def test_api_keys_guard_inference_and_say_nothing_of_the_keys(keyed_server) -> None:
    url = keyed_server.url
    missing, wrong = _classify(url, {}), _classify(url, {"Authorization": "Bearer " + KEY[:-1] + "x"})
    for status, headers, body in (missing, wrong):
        assert status == 401 and body["error"]["type"] == "unauthorized"
        assert headers["www-authenticate"].startswith("Bearer")
        assert KEY not in json.dumps(body) and OTHER_KEY not in json.dumps(body)
    assert missing[2] == wrong[2]  # the same answer whether a key was sent or not
    assert _classify(url, {"Authorization": "Bearer " + KEY})[0] == 200
    assert _classify(url, {"X-API-Key": OTHER_KEY})[0] == 200  # from the keys file
    assert request(url, "GET", "/models")[0] == 401
    assert request(url, "GET", "/models", headers={"X-API-Key": KEY})[0] == 200
    status, _, body = request(url, "GET", "/v2/models/tiny-cls")
    assert status == 401 and isinstance(body["error"], str)  # the protocol's error shape under /v2
    for path in ("/readyz", "/livez", "/metrics", "/v2/health/ready", "/", "/playground/"):
        assert request(url, "GET", path)[0] == 200, path  # health, metrics and pages stay open


def test_tritonclient_with_a_key(keyed_server) -> None:
    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(keyed_server.url.removeprefix("http://"))
    inp = triton.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([jpeg(scene(611).image)], dtype=object))
    with pytest.raises(InferenceServerException, match="401"):
        client.infer("tiny-cls", [inp])
    assert client.infer("tiny-cls", [inp], headers={"Authorization": f"Bearer {KEY}"}).as_numpy("logits").shape[0] == 1


def test_reload_endpoint_needs_the_admin_key(keyed_server) -> None:
    url, repo = keyed_server.url, keyed_server.repo
    _publish(repo, "tiny-det", "5", repo / "tiny-det" / "1" / "model.onnx")
    auth = {"X-API-Key": KEY}
    assert "5" not in _versions(url, "tiny-det", auth)  # no polling on this server
    assert request(url, "POST", "/admin/reload", headers=auth)[0] == 401  # an API key is not an admin key
    status, _, body = request(url, "POST", "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200 and body["added"] == ["tiny-det:5"] and "tiny-det:5" in body["models"]
    assert "5" in _versions(url, "tiny-det", auth)
    status, _, body = request(url, "POST", "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200 and not (body["added"] or body["removed"] or body["replaced"])


def test_closed_health_and_no_admin_key(tiny_repo, tmp_path) -> None:
    srv = start_server(tiny_repo, tmp_path / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_API_KEYS": KEY, "CONVSERVE_AUTH_HEALTH": "1"},
                       ready_headers={"X-API-Key": KEY})
    try:
        assert request(srv.url, "GET", "/readyz")[0] == 401 and request(srv.url, "GET", "/metrics")[0] == 401
        assert request(srv.url, "GET", "/readyz", headers={"X-API-Key": KEY})[0] == 200
        status, _, body = request(srv.url, "POST", "/admin/reload", headers={"X-API-Key": KEY})
        assert status == 403 and "CONVSERVE_ADMIN_KEYS" in body["error"]["message"]
    finally:
        stop_server(srv.proc)


def test_keys_are_off_by_default(server) -> None:
    assert _classify(server.url, {})[0] == 200
    assert request(server.url, "POST", "/admin/reload")[0] == 403  # and the admin route is off


# --- request ids, logs and spans ----------------------------------------------------------------

def test_request_ids_round_trip(server) -> None:
    status, headers, _ = _classify(server.url, {"X-Request-ID": "order-42/a"})
    assert status == 200 and headers["x-request-id"] == "order-42/a"
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert _classify(server.url, {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})[1]["x-request-id"] == trace
    made = _classify(server.url, {})[1]["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    assert _classify(server.url, {"X-Request-ID": "bad id with spaces"})[1]["x-request-id"] != "bad id with spaces"
    status, headers, _ = request(server.url, "POST", "/classify", b"junk", {"Content-Type": "image/jpeg",
                                                                           "X-Request-ID": "failing-1"})
    assert status == 400 and headers["x-request-id"] == "failing-1"  # errors carry it too
    assert request(server.url, "GET", "/v2/health/live", headers={"X-Request-ID": "v2-1"})[1]["x-request-id"] == "v2-1"


class _Collector(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        _Collector.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_json_logs_and_spans_follow_one_request(tiny_repo, tmp_path) -> None:
    """A real OTLP/HTTP receiver: the request's spans (decode, queue, inference, postprocess)
    arrive under the client's trace id, and the JSON log line of the request carries it; a gRPC
    call's spans arrive under the trace of the traceparent in its metadata."""
    import numpy as np
    import tritonclient.grpc as tg
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    port, grpc_port = free_port(), free_port()
    collector = ThreadingHTTPServer(("127.0.0.1", port), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    srv = start_server(tiny_repo, tmp_path / "serve.log", env={
        "CONVSERVE_DEVICE": "cpu", "CONVSERVE_OTLP_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
        "CONVSERVE_LOG_FORMAT": "json", "CONVSERVE_ACCESS_LOG": "1", "OTEL_BSP_SCHEDULE_DELAY": "200",
        "CONVSERVE_GRPC_PORT": str(grpc_port)})
    try:
        trace = uuid.uuid4().hex
        for k in range(2):  # one lone request (decoded and run in one thread), then two images (the queue)
            images = [("image", f"{i}.jpg", jpeg(scene(620 + i).image)) for i in range(k + 1)]
            body = multipart_body(images + [("model", None, b"tiny-cls")])
            status, headers, _ = request(srv.url, "POST", "/classify", body,
                                         {**MULTIPART, "traceparent": f"00-{trace}-00f067aa0ba902b{k}-01"})
            assert status == 200 and headers["x-request-id"] == trace

        grpc_trace = uuid.uuid4().hex  # and one gRPC call, in a trace of its own
        client = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        inp = tg.InferInput("images", [1], "BYTES")
        inp.set_data_from_numpy(np.array([jpeg(scene(622).image)], dtype=object))
        client.infer("tiny-cls", [inp], headers={"traceparent": f"00-{grpc_trace}-00f067aa0ba902c0-01"})

        def spans(trace: str = trace) -> list[str]:
            names = []
            for body in _Collector.bodies:
                req = ExportTraceServiceRequest.FromString(body)
                names += [s.name for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans
                          if s.trace_id.hex() == trace]
            return names

        names = _wait(lambda: (lambda n: n if {"decode", "queue", "postprocess"} <= set(n) and n.count("inference") >= 2
                               else None)(spans()), timeout=30, what="both requests' spans exported")
        assert names.count("inference") == 2 and any(n.startswith("POST") for n in names)  # BentoML's request span
        grpc_names = _wait(lambda: (lambda n: n if {"grpc ModelInfer", "inference"} <= set(n) else None)(
            spans(grpc_trace)), timeout=30, what="the gRPC call's spans exported")
        assert "decode" in grpc_names
        lines = [json.loads(ln) for ln in srv.log_text().splitlines() if ln.startswith("{")]
        mine = [ln for ln in lines if ln.get("request_id") == trace]
        assert any("POST /classify 200" in ln["message"] for ln in mine) and all(ln["level"] for ln in mine)
    finally:
        stop_server(srv.proc)
        collector.shutdown()


def test_queue_wait_is_a_histogram(server) -> None:
    _classify(server.url, {})
    metrics = get(server.url + "/metrics")[2]
    assert 'convserve_queue_wait_seconds_count{model="shapes-classifier:1"}' in metrics


# --- shutdown and crashes -----------------------------------------------------------------------

def test_sigterm_drains_then_exits(tiny_repo, tmp_path) -> None:
    """SIGTERM to `bentoml serve` (as `docker stop` sends it): not ready at once, new requests
    refused, the request already accepted answered, then the process exits."""
    srv = start_server(tiny_repo, tmp_path / "serve.log", env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_GRACE_S": "20"})
    try:
        body = multipart_body([("image", "a.jpg", jpeg(scene(630).image)), ("model", None, b"tiny-cls")])
        head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=testboundary\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        port = int(srv.url.rsplit(":", 1)[1])
        accepted = socket.create_connection(("127.0.0.1", port), timeout=30)
        accepted.sendall(head + body[:100])  # admitted, its body still arriving
        time.sleep(0.5)
        t0 = time.time()
        os.kill(srv.proc.pid, signal.SIGTERM)  # the supervisor only, as docker and Kubernetes do
        _wait(lambda: request(srv.url, "GET", "/readyz", timeout=5)[0] == 503, timeout=5, what="not ready")
        assert request(srv.url, "GET", "/v2/health/ready", timeout=5)[0] == 503
        status, headers, refused = _classify(srv.url, {})
        assert status == 503 and refused["error"]["type"] == "overloaded"
        assert "shutting down" in refused["error"]["message"]
        assert srv.proc.poll() is None  # still waiting for the accepted request
        accepted.sendall(body[100:])
        answer = b""
        while b'"labels"' not in answer:
            chunk = accepted.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        accepted.close()
        srv.proc.wait(timeout=25)
        took = time.time() - t0
        assert took < 20, took
        log = srv.log_text()
        assert "SIGTERM: draining" in log and "drained in" in log
    finally:
        stop_server(srv.proc)


def test_a_killed_worker_is_replaced(tiny_repo, tmp_path) -> None:
    srv = start_server(tiny_repo, tmp_path / "serve.log", env={"CONVSERVE_DEVICE": "cpu"})
    try:
        def worker() -> psutil.Process | None:
            for c in psutil.Process(srv.proc.pid).children(recursive=True):
                try:
                    if "_bentoml_impl.worker" in " ".join(c.cmdline()):
                        return c
                except psutil.Error:  # the killed one, not reaped yet
                    pass
            return None

        old = worker()
        assert old is not None
        t0 = time.time()
        old.kill()  # kill -9
        _wait(lambda: (lambda w: w is not None and w.pid != old.pid)(worker()), timeout=30, what="a new worker")
        _wait(lambda: _classify(srv.url, {})[0] == 200, timeout=60, what="serving again")
        took = time.time() - t0
        print(f"serving again {took:.1f} s after kill -9 of the worker")
        assert took < 60
    finally:
        stop_server(srv.proc)
