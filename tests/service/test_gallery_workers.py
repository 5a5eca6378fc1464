"""Galleries across processes, with the real server: two workers answer from the same gallery
(whichever gets the connection sees every acknowledged item), a worker killed with SIGKILL
and the whole server restarted lose nothing acknowledged, and a gallery whose model version
is no longer loaded says so instead of comparing another version's vectors. The same HTTP
routes on PostgreSQL + pgvector (CONVSERVE_GALLERY_URL=postgresql://...)."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.support.http import get, post, request
from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server
from training.identities import write_identities

pytestmark = pytest.mark.slow  # starts its own servers and a PostgreSQL

MODEL = "shapes-identities"
ADMIN = "gallery-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    out = tmp_path_factory.mktemp("worker-identities")
    write_identities(out, 24, 1, seed=23, size=96)
    return [p.read_bytes() for p in sorted(out.glob("*/0000.png"))]


def _repo(tmp: Path) -> Path:
    root = tmp / "models"
    shutil.copytree(SHIPPED_MODELS / MODEL / "1", root / MODEL / "1")
    return root


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(srv: Server) -> list[psutil.Process]:
    found = []
    for c in psutil.Process(srv.proc.pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker" in " ".join(c.cmdline()):
                found.append(c)
        except psutil.Error:
            pass
    return found


def _add(srv: Server, image: bytes, item: str) -> None:
    status, _, body = post(f"{srv.url}/galleries/g/items", files={"image": ("i.png", image)},
                           fields={"id": item, "metadata": json.dumps({"n": item}), "model": MODEL},
                           headers=AUTH)
    assert status == 201, body


def _count(srv: Server) -> int:
    status, _, body = get(f"{srv.url}/galleries/g", headers=AUTH)
    assert status == 200, body
    return body["count"]


def _found(srv: Server, image: bytes) -> str:
    status, _, body = post(f"{srv.url}/galleries/g/search", files={"image": ("q.png", image)}, fields={"k": "1"},
                           headers=AUTH)
    assert status == 200, body
    return body["matches"][0]["id"]


def test_two_workers_share_a_gallery_that_survives_a_killed_worker_and_a_restart(views: list[bytes],
                                                                                tmp_path: Path) -> None:
    env = {"CONVSERVE_DEVICE": "cpu", "CONVSERVE_WORKERS": "2", "CONVSERVE_ADMIN_KEYS": ADMIN,
           "CONVSERVE_API_KEYS": "a-user-key-of-16-chars",
           "CONVSERVE_GALLERY_URL": f"sqlite:///{tmp_path / 'galleries.db'}"}
    root = _repo(tmp_path)
    srv = start_server(root, tmp_path / "serve.log", env=env, ready_headers=AUTH)
    try:
        assert len(_workers(srv)) == 2
        status, _, body = request(srv.url, "POST", "/galleries", json.dumps({"name": "g", "model": MODEL}),
                                  {"Content-Type": "application/json", **AUTH})
        assert status == 201, body
        assert get(f"{srv.url}/galleries/g")[0] == 401  # keys on: the galleries need one too
        for i, image in enumerate(views[:12]):
            _add(srv, image, f"item-{i}")
        # each request on a new connection: SO_REUSEPORT hands them to either worker
        assert [_found(srv, image) for image in views[:12]] == [f"item-{i}" for i in range(12)]
        assert all(_count(srv) == 12 for _ in range(8))
        searched_by = set(re.findall(r"convserve:(\d+)\].*path=/galleries/g/search", srv.log_text()))
        assert searched_by == {"1", "2"}, searched_by  # both workers answered searches, and found every item
        # kill -9 a worker: the other serves, the replacement sees every acknowledged item
        victim = _workers(srv)[0]
        victim.kill()
        for i, image in enumerate(views[12:18], start=12):
            _add(srv, image, f"item-{i}")
        _wait(lambda: len([w for w in _workers(srv) if w.pid != victim.pid]) == 2, 60, "a replacement worker")
        _wait(lambda: get(f"{srv.url}/readyz", headers=AUTH)[0] == 200, 60, "ready again")
        assert all(_count(srv) == 18 for _ in range(8))
        # the model version the gallery holds goes away: refused with the reason, not compared
        shutil.copytree(root / MODEL / "1", root / MODEL / "2")
        shutil.rmtree(root / MODEL / "1")
        assert request(srv.url, "POST", "/admin/reload", b"", AUTH)[0] == 200
        _wait(lambda: post(f"{srv.url}/galleries/g/search", files={"image": ("q.png", views[0])},
                           headers=AUTH)[0] == 409, 30, "the unloaded version refused")
        status, _, body = post(f"{srv.url}/galleries/g/search", files={"image": ("q.png", views[0])}, headers=AUTH)
        assert body["error"]["type"] == "gallery_conflict" and f"{MODEL}:1, which is not loaded" in \
            body["error"]["message"]
        shutil.copytree(root / MODEL / "2", root / MODEL / "1")
        assert request(srv.url, "POST", "/admin/reload", b"", AUTH)[0] == 200
    finally:
        stop_server(srv.proc)
    srv = start_server(root, tmp_path / "serve-again.log", env=env, ready_headers=AUTH)
    try:
        assert _count(srv) == 18
        assert [_found(srv, views[i]) for i in (0, 11, 17)] == ["item-0", "item-11", "item-17"]
    finally:
        stop_server(srv.proc)


def test_the_same_routes_on_postgresql_with_pgvector(views: list[bytes], tmp_path: Path) -> None:
    from tests.support.postgres import postgres_server

    with postgres_server() as url:
        env = {"CONVSERVE_DEVICE": "cpu", "CONVSERVE_ADMIN_KEYS": ADMIN, "CONVSERVE_GALLERY_URL": url}
        srv = start_server(_repo(tmp_path), tmp_path / "serve.log", env=env, ready_headers=AUTH)
        try:
            status, _, body = request(srv.url, "POST", "/galleries", json.dumps({"name": "g", "model": MODEL}),
                                      {"Content-Type": "application/json", **AUTH})
            assert status == 201, body
            for i, image in enumerate(views[:10]):
                _add(srv, image, f"item-{i}")
            assert _count(srv) == 10
            assert [_found(srv, views[i]) for i in range(10)] == [f"item-{i}" for i in range(10)]
            assert request(srv.url, "DELETE", "/galleries/g/items/item-3", b"", AUTH)[0] == 200
            assert _count(srv) == 9 and _found(srv, views[3]) != "item-3"
        finally:
            stop_server(srv.proc)


@pytest.mark.parametrize("url,says", [
    ("off", "galleries are off on this deployment"),
    ("sqlite:////proc/convserve/galleries.db", "the gallery store cannot be opened"),  # no folder can be made there
])
def test_galleries_off_or_unopenable_are_503_and_the_rest_serves(views: list[bytes], tmp_path: Path, url: str,
                                                                 says: str) -> None:
    """A deployment without a shared store (the fleet, Kubernetes: CONVSERVE_GALLERY_URL=off) or
    with one that cannot be opened answers the gallery routes 503 with the reason, not 500;
    the task endpoints go on."""
    srv = start_server(_repo(tmp_path), tmp_path / "serve.log", env={"CONVSERVE_DEVICE": "cpu",
                                                                      "CONVSERVE_GALLERY_URL": url})
    try:
        for status, body in (request(srv.url, "POST", "/galleries", json.dumps({"name": "g", "model": MODEL}),
                                     {"Content-Type": "application/json"})[::2],
                             get(f"{srv.url}/galleries")[::2],
                             post(f"{srv.url}/galleries/g/search", files={"image": ("q.png", views[0])})[::2]):
            assert status == 503 and body["error"]["type"] == "galleries_unavailable", body
            assert says in body["error"]["message"]
        status, _, body = post(f"{srv.url}/embed", files={"image": ("q.png", views[0])})
        assert status == 200 and len(body["embedding"]) == 128
    finally:
        stop_server(srv.proc)
    if url != "off":
        assert "the gallery store sqlite cannot be opened" in srv.log_text()
