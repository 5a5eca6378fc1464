"""The repository's paths, and the real service started with ``bentoml serve`` on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from loadtest.processes import free_port

__all__ = ["ROOT", "SHIPPED_MODELS", "Server", "free_port", "start_server", "stop_server"]

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODELS = ROOT / "models"


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, grpc: str = "") -> None:
        self.proc, self.url, self.log = proc, url, log
        self.grpc = grpc  # host:port of its gRPC service

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model_root: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 120.0,
                 ready_headers: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> Server:
    """``bentoml serve`` on a free loopback port (run under ``prefix``, e.g. taskset); returns
    once /readyz answers 200 (asked with ``ready_headers``, e.g. an API key when health is closed)."""
    port = free_port()
    # Each server gets its own BENTOML_HOME: BentoML keeps its Prometheus multiprocess files
    # there, and two servers sharing one directory corrupt each other's /metrics.
    home = log.parent / f"bentoml-home-{port}"
    # Each server its own gRPC port too: every worker binds it with SO_REUSEPORT, so two servers
    # on one port would share each other's gRPC connections.
    full_env = {**os.environ, "CONVSERVE_MODEL_ROOT": str(model_root), "BENTOML_DO_NOT_TRACK": "true",
                "BENTOML_HOME": str(home), "CONVSERVE_GRPC_PORT": str(free_port()), "CONVSERVE_GRPC_HOST": "127.0.0.1",
                # galleries beside the log, never in the checkout
                "CONVSERVE_GALLERY_URL": f"sqlite:///{log.parent / f'galleries-{port}.db'}",
                **(env or {})}
    fh = open(log, "wb")
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "bentoml", "serve", "service.service:ConvServe",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/readyz", headers=ready_headers or {}),
                                        timeout=2) as r:
                if r.status == 200:
                    return Server(proc, url, log, f"127.0.0.1:{full_env['CONVSERVE_GRPC_PORT']}")
        except Exception:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
