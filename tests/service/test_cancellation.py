"""Work for a client that went away is dropped from the queue, never run, and counted: gRPC
deadlines and cancels, and a stream closed mid-way (service.batching drops cancelled images)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
from tritonclient.utils import InferenceServerException

from core.repository import discover
from loadtest.processes import free_port
from tests.support.http import get
from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server

pytestmark = pytest.mark.slow
MODEL = "shapes-segmenter"
IMAGES = 16  # per request: CONVSERVE_MAX_IMAGES


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """One run at a time, one image a run: a queue builds behind a burst."""
    port = free_port()
    srv = start_server(SHIPPED_MODELS, tmp_path_factory.mktemp("cancel") / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_GRPC_PORT": str(port), "CONVSERVE_GRPC_HOST":
                            "127.0.0.1", "CONVSERVE_INFERENCE_THREADS": "1", "CONVSERVE_PLACEMENT": "narrow",
                            "CONVSERVE_MAX_BATCH": "1"})
    yield srv, f"127.0.0.1:{port}"
    stop_server(srv.proc)


def _counters(url: str) -> tuple[float, float]:
    """Images the model ran (the batch-size histogram's sum) and images dropped, from /metrics."""
    status, _, text = get(url + "/metrics")
    assert status == 200

    def value(pattern: str) -> float:
        m = re.search(pattern + r'\{[^}]*model="' + MODEL + r':1"[^}]*\} ([0-9.e+]+)', text)
        return float(m.group(1)) if m else 0.0

    return value("convserve_batch_size_sum"), value("convserve_dropped_images_total")


def _tensor(c: tg.InferenceServerClient | tga.InferenceServerClient) -> tg.InferInput:
    inp = tg.InferInput("images", [IMAGES, 192, 192, 3], "UINT8")
    inp.set_data_from_numpy(np.random.default_rng(0).integers(0, 256, (IMAGES, 192, 192, 3), np.uint8))
    return inp


def _settle(url: str) -> tuple[float, float]:
    """The counters once the queue has drained (they stop moving)."""
    last = _counters(url)
    for _ in range(40):
        time.sleep(0.5)
        now = _counters(url)
        if now == last:
            return now
        last = now
    return last


def test_requests_whose_deadline_passed_are_not_run(slow_server: tuple[Server, str]) -> None:
    srv, target = slow_server
    client = tg.InferenceServerClient(target)
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert [int(d) for d in meta["inputs"][0]["shape"][1:]] == [192, 192, 3]
    # The deadline scales with this machine's speed: one request's time, measured, times three,
    # so the first requests of the burst are answered and the later ones wait in the queue past
    # it (a fixed 0.15 s ran out on a slow CI machine before any image had been queued).
    client.infer(MODEL, [_tensor(client)])
    t0 = time.perf_counter()
    client.infer(MODEL, [_tensor(client)])
    deadline = 3 * (time.perf_counter() - t0)
    ran0, dropped0 = _settle(srv.url)
    sent = 20 * IMAGES

    async def burst() -> list[object]:
        c = tga.InferenceServerClient(target)
        try:
            return await asyncio.gather(*(c.infer(MODEL, [_tensor(c)], client_timeout=deadline) for _ in range(20)),
                                        return_exceptions=True)
        finally:
            await c.close()

    results = asyncio.run(burst())
    timed_out = [r for r in results if isinstance(r, InferenceServerException)]
    assert timed_out, "no request outlived its deadline: the burst did not queue"
    assert all("DEADLINE_EXCEEDED" in str(r.status()) for r in timed_out)
    ran, dropped = _settle(srv.url)
    assert dropped - dropped0 > 0
    assert ran - ran0 < sent  # the model ran fewer images than were sent
    assert (ran - ran0) + (dropped - dropped0) <= sent
    # ... and the service goes on serving.
    assert client.infer(MODEL, [_tensor(client)]).as_numpy("class_map").shape[0] == IMAGES


def test_http_clients_that_disconnect_have_their_queued_images_dropped(slow_server: tuple[Server, str]) -> None:
    """Ten connections each POST 16 images to /segment and hang up before the answer."""
    import socket
    from urllib.parse import urlparse

    from tests.support.http import MULTIPART, multipart_body
    from tests.support.images import jpeg, scene

    srv, _ = slow_server
    u = urlparse(srv.url)
    body = multipart_body([("image", f"{i}.jpg", jpeg(scene(i, 192, 192).image)) for i in range(IMAGES)]
                          + [("model", None, MODEL.encode())])
    head = (f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART['Content-Type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    ran0, dropped0 = _settle(srv.url)
    sockets = []
    for _ in range(10):
        s = socket.create_connection((u.hostname, u.port))
        s.sendall(head + body)
        sockets.append(s)
    time.sleep(0.3)  # decoded and queued behind each other, one image a run
    for s in sockets:
        s.close()
    ran, dropped = _settle(srv.url)
    assert dropped - dropped0 > 0 and ran - ran0 < 10 * IMAGES, (ran - ran0, dropped - dropped0)
    status, _, answer = get(srv.url + "/readyz")
    assert status == 200


def test_a_stream_closed_mid_way_drops_its_queued_frames(slow_server: tuple[Server, str]) -> None:
    srv, target = slow_server
    client = tg.InferenceServerClient(target)
    ran0, dropped0 = _settle(srv.url)
    client.start_stream(callback=lambda result, error: None)
    for i in range(10):
        client.async_stream_infer(MODEL, [_tensor(client)], request_id=str(i))
    deadline = time.time() + 30
    while _counters(srv.url)[0] - ran0 < IMAGES + 4 and time.time() < deadline:
        pass  # until the model is inside the second frame: its other images wait in the queue
    client.stop_stream(cancel_requests=True)
    ran, dropped = _settle(srv.url)
    assert ran - ran0 < 10 * IMAGES and dropped - dropped0 > 0
    assert client.is_server_ready()


def test_a_video_whose_client_hangs_up_is_not_decoded_or_run_to_its_end(slow_server: tuple[Server, str]) -> None:
    """One line read of a 60-frame video, then the connection closed; three times. (A first
    version closed the file while its frame was still decoding, and the worker crashed.)"""
    import http.client
    import socket
    from urllib.parse import urlparse

    from tests.support.images import scene
    from tests.support.video import encode

    srv, _ = slow_server
    frames = 60
    data = encode([scene(i, 320, 240).image for i in range(frames)], "mp4")
    u = urlparse(srv.url)
    for _ in range(3):
        ran0, _ = _settle(srv.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("POST", f"/segment?model={MODEL}", body=data, headers={"Content-Type": "video/mp4"})
        resp = conn.getresponse()
        assert resp.status == 200 and b'"frame":0' in resp.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        ran, _ = _settle(srv.url)
        assert ran - ran0 < frames, ran - ran0
    assert get(srv.url + "/readyz")[0] == 200
    assert srv.log_text().count(f"ready: {len(discover(SHIPPED_MODELS))} model(s)") == 1  # the worker never restarted
