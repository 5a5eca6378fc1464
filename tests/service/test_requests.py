"""The request path over real HTTP: both ways of sending images, several images at once,
every kind of malformed request (a 4xx JSON error, then the next request is served), body
limits while reading, no server-side fetching, load shedding at admission, and the OpenAPI
document the routes publish."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from core import __version__
from tests.support.http import BOUNDARY, MULTIPART, get, multipart_body, post, raw_exchange, request
from tests.support.images import jpeg, scene
from tests.support.servers import ROOT, start_server, stop_server

pytestmark = pytest.mark.slow  # every test talks to a server it starts


def _ok(url: str) -> None:
    status, _, body = post(url + "/classify", {"image": ("x.jpg", jpeg(scene(1).image))})
    assert status == 200, body


def _error(status_body: tuple, status: int, type_: str) -> dict:
    got_status, headers, body = status_body
    assert got_status == status, body
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert isinstance(body, dict) and body["error"]["type"] == type_ and body["error"]["message"], body
    return body


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory):
    """A server with small limits; its temporary directory is watched (nothing may be spooled there)."""
    base = tmp_path_factory.mktemp("strict")
    (base / "tmp").mkdir()
    srv = start_server(ROOT / "models", base / "serve.log", env={
        "CONVSERVE_DEVICE": "cpu", "CONVSERVE_MAX_BYTES": "300000", "CONVSERVE_MAX_IMAGES": "3",
        "CONVSERVE_BODY_TIMEOUT_S": "2", "TMPDIR": str(base / "tmp")})
    srv.tmp = base / "tmp"  # type: ignore[attr-defined]
    yield srv
    stop_server(srv.proc)


# --- the three ways to send images give the same answers ---------------------------------

@pytest.mark.parametrize("endpoint,fields", [("classify", {"top_k": "3"}), ("detect", {"score_threshold": "0.2"}),
                                             ("segment", {"mask_format": "rle"})])
def test_raw_body_and_multi_image_answer_like_single_multipart(server, endpoint, fields) -> None:
    images = [jpeg(scene(800 + i, 240, 180).image) for i in range(3)]
    singles = []
    for data in images:
        status, _, body = post(f"{server.url}/{endpoint}", {"image": ("a.jpg", data)}, fields)
        assert status == 200, body
        singles.append(body)
    key = {"classify": "labels", "detect": "detections", "segment": "classes"}[endpoint]
    for data, single in zip(images, singles):  # the image as the whole body, options in the query
        query = "&".join(f"{k}={v}" for k, v in fields.items())
        status, _, raw = request(server.url, "POST", f"/{endpoint}?{query}", data, {"Content-Type": "image/jpeg"})
        assert status == 200 and raw[key] == single[key] and raw["image"] == single["image"], raw
        status, _, octet = request(server.url, "POST", f"/{endpoint}?{query}", data,
                                   {"Content-Type": "application/octet-stream"})
        assert status == 200 and octet[key] == single[key]
    body = multipart_body([("image", f"{i}.jpg", d) for i, d in enumerate(images)] +
                          [(k, None, v.encode()) for k, v in fields.items()])
    status, _, multi = request(server.url, "POST", f"/{endpoint}", body, MULTIPART)
    assert status == 200, multi
    assert [r[key] for r in multi["results"]] == [s[key] for s in singles]
    assert [r["image"] for r in multi["results"]] == [s["image"] for s in singles]
    assert multi["model"] == singles[0]["model"] and multi["timing"]["batch_size"] >= 1


def test_file_names_are_ignored_whatever_they_hold(server) -> None:
    """A newline, quotes or a path in a file name: the name is never used, the image is served."""
    data = jpeg(scene(3).image)
    for name in ("a\nb.jpg", "../../etc/passwd", "", "n" * 3000):
        body = multipart_body([("image", name, data)])
        status, _, answer = request(server.url, "POST", "/classify", body, MULTIPART)
        assert status == 200 and answer["labels"], (name, answer)


def test_an_image_sent_as_a_text_field_is_data(server) -> None:
    """curl -F 'image=<file' sends the file as a text field (no filename): still an image."""
    data = jpeg(scene(3).image)
    status, _, with_name = request(server.url, "POST", "/classify", multipart_body([("image", "a.jpg", data)]),
                                   MULTIPART)
    status2, _, without = request(server.url, "POST", "/classify", multipart_body([("image", None, data)]),
                                  MULTIPART)
    assert status == status2 == 200 and with_name["labels"] == without["labels"]


# --- malformed requests ------------------------------------------------------------------

MALFORMED = {
    # (headers, body) -> (status, type)
    "carriage_return_in_filename": (MULTIPART, multipart_body([("image", "a\r.jpg", b"x")]),
                                    400, "malformed_request"),
    "very_long_filename": (MULTIPART, multipart_body([("image", "a" * 10000 + ".jpg", b"x")]),
                           400, "malformed_request"),
    "file_under_another_name": (MULTIPART, multipart_body([("file", "a.jpg", b"\xff\xd8" + b"x" * 5000)]),
                                422, "invalid_parameter"),
    "image_as_text_url": (MULTIPART, multipart_body([("image", None, b"http://127.0.0.1:9/x.jpg")]),
                          400, "invalid_image"),
    "broken_boundary": (MULTIPART, multipart_body([("image", "a.jpg", b"x")], boundary="otherboundary"),
                        400, "malformed_request"),
    "no_parts": (MULTIPART, f"--{BOUNDARY}--\r\n".encode(), 422, "invalid_parameter"),
    "empty_multipart_body": (MULTIPART, b"", 400, "malformed_request"),
    "no_closing_boundary": (MULTIPART, multipart_body([("image", "a.jpg", b"x")], close=False),
                            400, "malformed_request"),
    "multipart_without_boundary": ({"Content-Type": "multipart/form-data"}, b"--x\r\n", 400, "malformed_request"),
    "part_without_disposition": (MULTIPART,
                                 f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n\r\nxx\r\n--{BOUNDARY}--\r\n".encode(),
                                 400, "malformed_request"),
    "no_content_type": ({}, b"abc", 415, "unsupported_media_type"),
    "json_body": ({"Content-Type": "application/json"}, b'{"image": "x"}', 415, "unsupported_media_type"),
    "text_body": ({"Content-Type": "text/plain"}, b"hello", 415, "unsupported_media_type"),
    "empty_raw_body": ({"Content-Type": "image/jpeg"}, b"", 422, "invalid_parameter"),
    "raw_body_not_an_image": ({"Content-Type": "application/octet-stream"}, b"not an image at all",
                              400, "invalid_image"),
    "unknown_option": (MULTIPART, None, 422, "invalid_parameter"),
    "duplicate_option": (MULTIPART, None, 422, "invalid_parameter"),
    "option_too_long": (MULTIPART, None, 422, "invalid_parameter"),
    "option_not_utf8": (MULTIPART, None, 422, "invalid_parameter"),
    "option_in_query_and_form": (MULTIPART, None, 422, "invalid_parameter"),
    "too_many_parts": (MULTIPART, multipart_body([(f"f{i}", None, b"1") for i in range(70)]),
                       400, "malformed_request"),
    "huge_part_headers": (MULTIPART, f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"\r\n"
                                     f"X-Pad: {'p' * 6000}\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
                          400, "malformed_request"),
}


def _malformed_body(case: str) -> tuple[bytes, str]:
    good = jpeg(scene(2).image)
    path = "/classify"
    body = {
        "unknown_option": multipart_body([("image", "a.jpg", good), ("topk", None, b"3")]),
        "duplicate_option": multipart_body([("image", "a.jpg", good), ("top_k", None, b"3"), ("top_k", None, b"4")]),
        "option_too_long": multipart_body([("image", "a.jpg", good), ("model", None, b"m" * 5000)]),
        "option_not_utf8": multipart_body([("image", "a.jpg", good), ("model", None, b"\xff\xfe")]),
        "option_in_query_and_form": multipart_body([("image", "a.jpg", good), ("top_k", None, b"3")]),
    }[case]
    if case == "option_in_query_and_form":
        path = "/classify?top_k=2"
    return body, path


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_are_4xx_json_and_the_server_keeps_serving(server, case) -> None:
    headers, body, status, type_ = MALFORMED[case]
    path = "/classify"
    if body is None:
        body, path = _malformed_body(case)
    _error(request(server.url, "POST", path, body, headers), status, type_)
    _ok(server.url)


def test_other_methods_and_unknown_routes_are_json_errors(server) -> None:
    _error(get(server.url + "/classify"), 405, "method_not_allowed")
    _error(request(server.url, "PUT", "/detect", b"x", {"Content-Type": "image/jpeg"}), 405, "method_not_allowed")
    _error(get(server.url + "/no-such-route"), 404, "not_found")


def test_a_url_in_an_image_field_is_never_fetched(server) -> None:
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    listener = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{listener.server_port}/cat.jpg".encode()
    try:
        for body in (multipart_body([("image", None, url)]), multipart_body([("image", "u.txt", url)])):
            _error(request(server.url, "POST", "/classify", body, MULTIPART), 400, "invalid_image")
        _error(request(server.url, "POST", "/classify", url, {"Content-Type": "application/octet-stream"}),
               400, "invalid_image")
        time.sleep(0.5)
    finally:
        listener.shutdown()
    assert hits == []


def test_one_bad_image_among_several_is_named(server) -> None:
    body = multipart_body([("image", "a.jpg", jpeg(scene(4).image)), ("image", "b.jpg", b"garbage")])
    err = _error(request(server.url, "POST", "/classify", body, MULTIPART), 400, "invalid_image")
    assert err["error"]["message"].startswith("image 2 of 2:")


# --- limits while reading ----------------------------------------------------------------

def test_chunked_upload_over_the_limit_is_refused_without_being_stored(strict) -> None:
    """No Content-Length: the limit is counted as chunks arrive; nothing is written to disk."""
    sent = {"bytes": 0}
    before = sorted(strict.tmp.rglob("*"))

    def chunks():
        for _ in range(200):  # 200 x 64 KiB = 12.5 MiB offered against a 300 kB limit
            sent["bytes"] += 65536
            yield b"\xff" * 65536

    with pytest.raises(OSError):  # the server answers and closes while we are still sending...
        request(strict.url, "POST", "/classify", chunks(), {"Content-Type": "image/jpeg"}, chunked=True)
    assert sent["bytes"] < 200 * 65536
    status, headers, body = raw_exchange(strict.url, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Type: image/jpeg\r\n"
                                         b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
                                             f"{65536:x}\r\n".encode() + b"\x00" * 65536 + b"\r\n" for _ in range(6)))
    assert status == 413 and body["error"]["type"] == "payload_too_large" and headers.get("connection") == "close"
    assert sorted(strict.tmp.rglob("*")) == before  # BentoML's own start-up files only
    _ok(strict.url)


def test_declared_length_over_the_limit_is_refused_before_the_body(strict) -> None:
    status, headers, body = raw_exchange(strict.url, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Type: image/jpeg\r\nContent-Length: 50000000\r\n\r\n")
    assert status == 413 and body["error"]["type"] == "payload_too_large"
    _ok(strict.url)


def test_too_many_images(strict) -> None:
    data = jpeg(scene(5, 64, 48).image)
    body = multipart_body([("image", f"{i}.jpg", data) for i in range(4)])
    _error(request(strict.url, "POST", "/classify", body, MULTIPART), 413, "too_many_images")
    three = multipart_body([("image", f"{i}.jpg", data) for i in range(3)])
    status, _, ok = request(strict.url, "POST", "/classify", three, MULTIPART)
    assert status == 200 and len(ok["results"]) == 3


def test_a_body_that_never_arrives_times_out_with_408(strict) -> None:
    t0 = time.time()
    status, headers, body = raw_exchange(strict.url, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\nonly a little",
                                         timeout=20)
    assert status == 408 and body["error"]["type"] == "request_timeout" and 1.5 < time.time() - t0 < 10
    _ok(strict.url)


def test_a_client_that_hangs_up_mid_body_leaves_the_server_serving(strict) -> None:
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", int(strict.url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                      b"Content-Length: 100000\r\n\r\nabc")
    _ok(strict.url)


# --- load shedding at admission ----------------------------------------------------------

def test_a_full_worker_queues_unread_then_refuses_before_reading_the_body(tmp_path: Path) -> None:
    """With room for one request, others wait unread for CONVSERVE_ADMISSION_WAIT_MS: one
    whose wait runs out gets 503 + Retry-After + Connection: close without its body ever
    being sent; one that arrived in time is served as soon as the first is answered."""
    srv = start_server(ROOT / "models", tmp_path / "serve.log", env={
        "CONVSERVE_DEVICE": "cpu", "CONVSERVE_MAX_QUEUE": "1", "CONVSERVE_ADMISSION_WAIT_MS": "400"})
    try:
        host, port = "127.0.0.1", int(srv.url.rsplit(":", 1)[1])
        data = jpeg(scene(6).image)
        request_head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n")
        holder = socket.create_connection((host, port), timeout=30)
        holder.sendall(request_head.encode() + data[:100])
        time.sleep(0.5)  # the first request is admitted and reading its body
        t0 = time.time()
        status, headers, body = raw_exchange(srv.url, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Type: image/jpeg\r\nContent-Length: 30000000\r\n\r\n")
        waited = time.time() - t0
        assert status == 503 and body["error"]["type"] == "overloaded", body
        assert headers.get("retry-after") == "1" and headers.get("connection") == "close"
        assert 0.3 <= waited < 3, waited
        waiter = socket.create_connection((host, port), timeout=30)
        waiter.sendall(request_head.encode() + data)  # waits in line, unread
        time.sleep(0.1)
        holder.sendall(data[100:])
        assert holder.recv(65536).startswith(b"HTTP/1.1 200")
        assert waiter.recv(65536).startswith(b"HTTP/1.1 200")
        holder.close()
        waiter.close()
        _ok(srv.url)
    finally:
        stop_server(srv.proc)


# --- the OpenAPI document ----------------------------------------------------------------

def test_openapi_describes_what_the_routes_really_do(server) -> None:
    status, _, spec = get(server.url + "/docs.json")
    assert status == 200
    from service.endpoints import ENDPOINTS
    from service.uploads import VIDEO_TYPES

    for endpoint, option in (("classify", "top_k"), ("detect", "score_threshold"), ("segment", "mask_format"),
                             ("embed", "model")):
        op = spec["paths"][f"/{endpoint}"]["post"]
        options = ({o.name for o in ENDPOINTS[endpoint].options} | {"frame_step"}
                   | ({"render"} if ENDPOINTS[endpoint].drawable else set()))
        assert option in options
        content = op["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "image/*", "application/octet-stream", *VIDEO_TYPES}
        form = content["multipart/form-data"]["schema"]
        assert form["anyOf"] == [{"required": ["image"]}, {"required": ["video"]}]
        assert set(form["properties"]) == {"image", "video"} | options
        assert {p["name"] for p in op["parameters"]} == options and all(p["in"] == "query" for p in op["parameters"])
        assert set(op["responses"]) == {"200", "400", "401", "404", "408", "413", "415", "422", "500", "503"}
        assert set(op["responses"]["200"]["content"]) == {"application/json", "image/png", "image/jpeg",
                                                          "application/x-ndjson"}
        assert op["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    schemas = spec["components"]["schemas"]
    assert {"ErrorBody", "ClassifyResponse", "ClassifyBatchResponse", "DetectResponse", "SegmentResponse",
            "EmbedResponse", "ModelList", "V2InferRequest", "V2InferResponse", "V2ModelMetadata"} <= set(schemas)
    assert spec["info"]["title"] == "convserve" and spec["info"]["version"] == __version__
    assert "contact" not in spec["info"] and "BentoML" not in json.dumps(spec["info"])
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"400", "404", "413", "503"} <= set(infer["responses"])
    models = spec["paths"]["/models"]["get"]["responses"]["200"]["content"]["application/json"]
    assert models["schema"]["$ref"].endswith("/ModelList")
    assert spec["paths"]["/classify"]["post"]["parameters"][1]["schema"]["maximum"] == 1000
