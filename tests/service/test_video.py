"""A video POSTed to the task endpoints: one JSON line per sampled frame, each equal to the
endpoint's answer for that frame sent as a lossless image (the pixels the decoder gives); the
limits on frames and pixels; hostile files (service.video, core.video)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from core.repository import discover
from tests.support.http import multipart_body, post, request
from tests.support.images import scene
from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server
from tests.support.video import decode, encode

pytestmark = pytest.mark.slow
MAX_FRAMES = 40
FPS = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(SHIPPED_MODELS, tmp_path_factory.mktemp("video") / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_MAX_VIDEO_FRAMES": str(MAX_FRAMES),
                            "CONVSERVE_MAX_VIDEO_PIXELS": str(640 * 480)})
    yield srv
    stop_server(srv.proc)


def _frames(n: int, width: int = 320, height: int = 240) -> list[Image.Image]:
    return [scene(100 + i, width, height).image for i in range(n)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _post_video(url: str, path: str, data: bytes, content_type: str = "video/mp4") -> tuple[int, str, list]:
    """POST ``data``; (status, content type, the JSON lines) or the error document as one item."""
    status, headers, body = request(url, "POST", path, data, {"Content-Type": content_type})
    if isinstance(body, dict):  # an error answer: one JSON document
        return status, headers.get("content-type", ""), [body]
    return status, headers.get("content-type", ""), [json.loads(line) for line in body.splitlines()]


def _image_answer(url: str, endpoint: str, frame: np.ndarray, **options: str) -> dict:
    status, _, answer = post(f"{url}/{endpoint}", files={"image": ("f.png", _png(frame))}, fields=options)
    assert status == 200, answer
    return answer


@pytest.mark.parametrize(("endpoint", "key", "container", "options"), [
    ("detect", "detections", "mp4", {"score_threshold": "0.3"}),
    ("classify", "labels", "webm", {"top_k": "2"}),
    ("segment", "classes", "mp4", {}),
])
def test_each_sampled_frame_is_answered_in_order_as_its_image_would_be(
        server: Server, endpoint: str, key: str, container: str, options: dict[str, str]) -> None:
    data = encode(_frames(12), container, fps=FPS)
    decoded = decode(data)
    query = "&".join(f"{k}={v}" for k, v in {**options, "frame_step": "3"}.items())
    status, ctype, lines = _post_video(server.url, f"/{endpoint}?{query}", data, f"video/{container}")
    assert status == 200 and ctype == "application/x-ndjson", lines
    *frames, done = lines
    assert [f["frame"] for f in frames] == [0, 3, 6, 9]
    assert [f["time_s"] for f in frames] == pytest.approx([0.0, 0.3, 0.6, 0.9], abs=1e-3)
    for f in frames:
        assert f[key] == _image_answer(server.url, endpoint, decoded[f["frame"]], **options)[key]
    assert done["done"] is True and done["frames"] == 4 and done["decoded_frames"] == 12 and done["frame_step"] == 3
    assert done["video"]["container"] == container and done["video"]["width"] == 320
    assert done["video"]["height"] == 240 and done["video"]["fps"] == FPS


def test_the_video_field_of_a_multipart_form(server: Server) -> None:
    data = encode(_frames(4), "mp4", fps=FPS)
    body = multipart_body([("video", "clip.mp4", data), ("top_k", None, b"1")])
    status, headers, text = request(server.url, "POST", "/classify", body,
                                    {"Content-Type": "multipart/form-data; boundary=testboundary"})
    lines = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and [len(x["labels"]) for x in lines[:-1]] == [1, 1, 1, 1] and lines[-1]["frames"] == 4


def test_the_display_rotation_is_applied_like_exif_orientation(server: Server) -> None:
    """A phone's portrait video: landscape frames and a display matrix turning them 90 degrees."""
    data = encode(_frames(2), "mp4", fps=FPS, rotation=90)
    decoded = decode(data)  # as stored: landscape
    status, _, lines = _post_video(server.url, "/detect", data)
    assert status == 200
    upright = np.ascontiguousarray(np.rot90(decoded[0], k=1))  # 90 degrees counter-clockwise
    assert upright.shape[:2] == (320, 240)
    assert lines[0]["detections"] == _image_answer(server.url, "detect", upright)["detections"]
    assert lines[0]["detections"] != _image_answer(server.url, "detect", decoded[0])["detections"]


def test_a_declared_frame_count_over_the_limit_is_refused_before_decoding(server: Server) -> None:
    status, _, (error,) = _post_video(server.url, "/detect", encode(_frames(MAX_FRAMES + 1), "mp4"))
    assert status == 413 and error["error"]["type"] == "video_too_large"
    assert f"at most {MAX_FRAMES}" in error["error"]["message"]


def test_an_undeclared_frame_count_stops_at_the_limit_with_an_error_line(server: Server) -> None:
    """WebM declares no frame count: the stream answers up to the limit, then says why it ends."""
    frames = _frames(4) * ((MAX_FRAMES + 8) // 4)
    status, _, lines = _post_video(server.url, "/classify?frame_step=10", encode(frames, "webm"), "video/webm")
    assert status == 200
    assert [x.get("frame") for x in lines[:-1]] == [0, 10, 20, 30]
    assert lines[-1]["error"]["type"] == "video_too_large"


def test_frames_over_the_pixel_limit_are_refused_from_the_header(server: Server) -> None:
    status, _, (error,) = _post_video(server.url, "/detect", encode(_frames(2, 800, 608), "mp4"))
    assert status == 413 and error["error"]["type"] == "video_too_large" and "800x608" in error["error"]["message"]


@pytest.mark.parametrize(("body", "ctype", "status", "type_"), [
    (b"not a video at all", "video/mp4", 400, "invalid_video"),
    (b"\x00\x00\x00\x18ftypisom" + bytes(200), "video/mp4", 400, "invalid_video"),
    (b"\x1a\x45\xdf\xa3" + bytes(200), "video/webm", 400, "invalid_video"),
    (b"", "video/mp4", 422, "invalid_parameter"),
])
def test_files_that_are_not_videos_are_4xx(server: Server, body: bytes, ctype: str, status: int, type_: str) -> None:
    got, _, (error,) = _post_video(server.url, "/detect", body, ctype)
    assert got == status and error["error"]["type"] == type_, error


def test_a_cut_file_and_bad_options_are_4xx(server: Server) -> None:
    data = encode(_frames(6), "mp4")
    status, _, (error,) = _post_video(server.url, "/detect", data[: len(data) // 2])
    assert status == 400 and error["error"]["type"] == "invalid_video"
    for query, field in (("frame_step=0", "frame_step"), ("render=png", "render"), ("top_k=3", "top_k")):
        status, _, (error,) = _post_video(server.url, f"/detect?{query}", data)
        assert status == 422 and error["error"]["message"].startswith(field), error
    body = multipart_body([("video", "a.mp4", data), ("image", "b.png", _png(decode(data)[0]))])
    status, _, answer = request(server.url, "POST", "/detect", body,
                                {"Content-Type": "multipart/form-data; boundary=testboundary"})
    assert status == 422 and "one video" in answer["error"]["message"]


def test_a_playlist_sent_as_a_video_makes_no_request(server: Server) -> None:
    """An HLS playlist naming a URL on this machine: no demuxer but MP4's and WebM's is ever
    tried, so nothing connects to the listener."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(2)
    port = listener.getsockname()[1]
    connections: list[object] = []

    def accept() -> None:
        try:
            connections.append(listener.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:{port}/a.ts\n#EXT-X-ENDLIST\n"
    for ctype in ("video/mp4", "video/webm"):
        status, _, (error,) = _post_video(server.url, "/detect", playlist.encode(), ctype)
        assert status == 400 and error["error"]["type"] == "invalid_video"
    thread.join()
    listener.close()
    assert connections == []


def test_a_long_video_is_streamed_in_chunks_and_the_worker_goes_on(server: Server) -> None:
    data = encode(_frames(MAX_FRAMES, 640, 480), "mp4")
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/segment", body=data, headers={"Content-Type": "video/mp4"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked"
    first = json.loads(resp.readline())
    assert first["frame"] == 0
    rest = [json.loads(line) for line in resp.read().splitlines()]
    conn.close()
    assert [x["frame"] for x in rest[:-1]] == list(range(1, MAX_FRAMES)) and rest[-1]["frames"] == MAX_FRAMES
    status, _, answer = post(f"{server.url}/detect", files={"image": ("f.png", _png(decode(data)[0]))})
    assert status == 200  # and the worker goes on serving images


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_corrupted_videos_never_take_the_worker_down(server: Server, container: str) -> None:
    """30 copies of a video with random bytes overwritten after its header (broken frames,
    lengths, timestamps): each answered with 200 (frames, then maybe an error line) or a 4xx,
    never a 5xx, and the worker never restarts (FFmpeg's decoders are C)."""
    data = bytearray(encode(_frames(20), container))
    rng = np.random.default_rng(7)
    statuses = []
    for _ in range(30):
        broken = bytearray(data)
        for at in rng.integers(64, len(broken), 12):
            broken[at:at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        status, _, lines = _post_video(server.url, "/detect", bytes(broken), f"video/{container}")
        statuses.append(status)
        assert status in (200, 400, 413, 422), (status, lines[-1])
        if status == 200:
            assert "done" in lines[-1] or lines[-1]["error"]["type"] in ("invalid_video", "video_too_large")
    assert post(f"{server.url}/detect", files={"image": ("f.png", _png(decode(bytes(data))[0]))})[0] == 200
    assert server.log_text().count(f"ready: {len(discover(SHIPPED_MODELS))} model(s)") == 1, "a worker restarted"
    print(f"{container}: statuses {sorted(statuses)}")
