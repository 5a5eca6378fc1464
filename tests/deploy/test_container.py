"""The real container: build the Bento's image, run it, probe it; then the same via docker-compose.

Needs a Docker engine: ../shared/tools/container-engine starts one here (and the base image a
Bento's Dockerfile needs). Where none can be had the tests skip and say why.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from core.tasks import TASKS
from tests.support.commands import run as _run
from tests.support.http import get, post, request
from tests.support.images import jpeg, scene
from tests.support.servers import free_port
from training.figures import render_figures

pytestmark = pytest.mark.slow  # builds and runs container images

ROOT = Path(__file__).resolve().parents[2]


def _wait_ready(url: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if get(url + "/readyz", timeout=3)[0] == 200:
                return
        except Exception:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not ready after {timeout}s")


def _probe(url: str) -> None:
    """Each endpoint answers a real image correctly enough; errors are JSON 4xx."""
    sc = scene(77, 320, 240)
    data = jpeg(sc.image)
    status, _, body = post(url + "/classify", {"image": ("a.jpg", data)})
    assert status == 200 and body["labels"] and body["model"]["name"] == "shapes-classifier"
    status, _, body = post(url + "/detect", {"image": ("a.jpg", data)})
    assert status == 200 and body["detections"], body
    status, _, body = post(url + "/segment", {"image": ("a.jpg", data)})
    assert status == 200 and body["classes"] and "rle" in body["classes"][0]
    status, _, body = post(url + "/instances", {"image": ("a.jpg", data)})
    assert status == 200 and body["detections"] and "rle" in body["detections"][0], body
    figure = io.BytesIO()
    render_figures(np.random.default_rng(3), 256, 256, 2, 0)[0].save(figure, format="JPEG")
    status, _, body = post(url + "/keypoints", {"image": ("f.jpg", figure.getvalue())})
    assert status == 200 and body["detections"] and len(body["detections"][0]["keypoints"]) == 13, body
    status, _, body = post(url + "/classify", {"image": ("a.txt", b"not an image")})
    assert status == 400 and body["error"]["type"] == "invalid_image"
    status, _, body = get(url + "/models")
    assert status == 200 and {m["task"] for m in body["models"]} == set(TASKS)
    # a gallery in the container's default store (SQLite in its working directory)
    gallery = f"g{uuid.uuid4().hex[:8]}"
    status, _, body = request(url, "POST", "/galleries", json.dumps({"name": gallery, "model": "shapes-identities"}),
                              {"Content-Type": "application/json"})
    assert status == 201, body
    status, _, body = post(f"{url}/galleries/{gallery}/items", {"image": ("a.jpg", data)}, {"id": "scene-77"})
    assert status == 201 and body["count"] == 1, body
    status, _, body = post(f"{url}/galleries/{gallery}/search", {"image": ("a.jpg", data)})
    assert status == 200 and body["matches"][0]["id"] == "scene-77", body


FIND_WORKER = ("import os; print(next(p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid() and "
               "b'_bentoml_impl.worker' in open(f'/proc/{p}/cmdline', 'rb').read()))")


def _worker_pid(container: str) -> str:
    return _run(["docker", "exec", container, "python", "-c", FIND_WORKER]).stdout.strip()


IMAGE_LIMIT_BYTES = 1.0e9  # the CPU image: ONNX Runtime's CPU build, no CUDA libraries


def test_cpu_image_is_lean(image: str) -> None:
    size = int(_run(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout.strip())
    print(f"{image}: {size / 1e9:.2f} GB")
    assert size <= IMAGE_LIMIT_BYTES, f"{size / 1e9:.2f} GB"
    pkgs = _run(["docker", "run", "--rm", "--entrypoint", "python", image, "-c",
                 "import importlib.metadata as m; "
                 "print(' '.join(sorted(d.metadata['Name'].lower() for d in m.distributions())))"])
    names = pkgs.stdout.split()
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names and "torch" not in names


def test_image_runs_as_non_root_and_serves(image: str) -> None:
    port = free_port()
    name = f"convserve-test-{uuid.uuid4().hex[:8]}"
    _run(["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000", "-e", "CONVSERVE_DEVICE=cpu", image])
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        _probe(url)
        user = _run(["docker", "exec", name, "id", "-u"]).stdout.strip()
        assert user != "0"
        has_torch = _run(["docker", "exec", name, "python", "-c",
                          "import importlib.util as u; print(u.find_spec('torch') is not None)"]).stdout.strip()
        assert has_torch == "False"
        status, _, body = get(url + "/models")
        assert all(m["providers"] == ["CPUExecutionProvider"] for m in body["models"])
        # a killed worker comes back inside the container too (BentoML would not respawn it there)
        worker = _worker_pid(name)
        t0 = time.time()
        _run(["docker", "exec", name, "python", "-c", f"import os; os.kill({worker}, 9)"])
        time.sleep(1)
        _wait_ready(url, timeout=60)
        status, _, body = post(url + "/classify", {"image": ("a.jpg", jpeg(scene(78).image))})
        assert status == 200, body
        print(f"container: serving again {time.time() - t0:.1f} s after kill -9 of the worker")
        assert _worker_pid(name) != worker
        # docker stop: SIGTERM, drain, exit well before docker's SIGKILL
        t0 = time.time()
        _run(["docker", "stop", "-t", "30", name])
        assert time.time() - t0 < 15
        exit_code = _run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name]).stdout.strip()
        assert exit_code != "137", "killed, not drained"
    finally:
        logs = _run(["docker", "logs", name], check=False)
        _run(["docker", "rm", "-f", name], check=False)
    assert "SIGTERM: draining" in logs.stdout + logs.stderr
    assert "Traceback" not in logs.stdout + logs.stderr


def test_compose_up_healthy_and_serving(image: str, tmp_path: Path) -> None:
    port = free_port()
    project = f"cs{uuid.uuid4().hex[:8]}"
    env = {"CONVSERVE_IMAGE": image, "CONVSERVE_PORT": str(port), "CONVSERVE_MODELS": str(ROOT / "models")}
    base = ["docker-compose", "-p", project, "-f", str(ROOT / "docker-compose.yml")]
    _run(base + ["up", "-d"], env=env)
    try:
        container = f"{project}_convserve_1"
        deadline, health = time.time() + 240, ""
        while time.time() < deadline:
            health = _run(["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
                          check=False).stdout.strip()
            if health == "healthy":
                break
            time.sleep(2)
        assert health == "healthy", _run(["docker", "logs", container], check=False).stdout[-3000:]
        _probe(f"http://127.0.0.1:{port}")
        mounts = json.loads(_run(["docker", "inspect", "-f", "{{json .Mounts}}", container]).stdout)
        assert any(m["Destination"] == "/models" and not m["RW"] for m in mounts)
    finally:
        _run(base + ["down", "-v", "--remove-orphans"], env=env, check=False)


def test_compose_file_is_valid() -> None:
    exe = shutil.which("docker-compose")
    if not exe:
        pytest.skip("docker-compose is not installed (../shared/tools/container-engine installs it)")
    for profile in ([], ["--profile", "gpu"]):
        r = _run([exe, *profile, "-f", str(ROOT / "docker-compose.yml"), "config"])
        cfg = r.stdout
        assert "healthcheck" in cfg and "/readyz" in cfg and "restart: unless-stopped" in cfg
        assert "stop_grace_period: 30s" in cfg and "CONVSERVE_GRACE_S: '25'" in cfg
        if profile:
            assert "driver: nvidia" in cfg and "convserve-gpu" in cfg
