"""Spreading keep-alive connections over workers: the shared counts, then two real workers."""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path

import psutil
import pytest

from service.balancing import Balancer, create_file
from tests.support.http import multipart_body
from tests.support.images import jpeg, scene
from tests.support.servers import ROOT, start_server, stop_server


def test_a_worker_holding_more_than_its_share_closes() -> None:
    path = create_file(2)
    try:
        a, b = Balancer(path, 0, 2), Balancer(path, 1, 2)
        a.publish(6)
        b.publish(0)
        assert a.should_close(6) and not b.should_close(0)  # share = ceil(6 / 2) = 3
        b.publish(3)
        a.publish(3)
        assert not a.should_close(3) and not b.should_close(3)  # even: nothing closes
        a.publish(1)
        b.publish(0)
        assert not a.should_close(1)  # one request is never moved
        assert a.closed == 1 and b.closed == 0
    finally:
        path.unlink()


def _client(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str], stop: threading.Event,
            closes: list[int]) -> None:
    """One keep-alive client: reconnects only when the server closes the connection."""
    port = conn.port
    while not stop.is_set():
        conn.request("POST", "/classify", body, headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        if resp.getheader("connection", "").lower() == "close":
            closes.append(1)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.close()


@pytest.mark.slow
def test_two_workers_both_serve_keep_alive_clients(tmp_path: Path) -> None:
    srv = start_server(ROOT / "models", tmp_path / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_WORKERS": "2"})
    try:
        workers = psutil.Process(srv.proc.pid).children()
        assert len(workers) == 2
        cpu0 = {w.pid: sum(w.cpu_times()[:2]) for w in workers}
        data = jpeg(scene(3, 640, 480).image)
        body = multipart_body([("image", "a.jpg", data)], boundary="b")
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
        stop, closes = threading.Event(), []
        port = int(srv.url.rsplit(":", 1)[1])
        # Like wrk or a connection pool: every connection opened at once, before any request.
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(8)]
        for conn in conns:
            conn.connect()
        clients = [threading.Thread(target=_client, args=(conn, body, headers, stop, closes)) for conn in conns]
        for c in clients:
            c.start()
        time.sleep(8)
        stop.set()
        for c in clients:
            c.join(60)
        used = {w.pid: sum(w.cpu_times()[:2]) - cpu0[w.pid] for w in workers}
        # Without balancing one worker accepts all eight connections and the other idles.
        assert min(used.values()) > 0.2 * sum(used.values()), used
        assert closes, "no connection was ever moved"
    finally:
        stop_server(srv.proc)
