"""Server subprocesses for the benchmark, and the memory of a whole process tree.

:class:`ServerProcess` starts a command on a free loopback port and waits for a readiness
path; :class:`TreeMemory` samples the summed RSS of a process and all its descendants
(``bentoml serve``'s supervisor plus its workers) in a background thread.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """Bytes of resident memory of ``pid`` and every descendant (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class TreeMemory:
    """Peak and last summed RSS of a process tree, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak = self.last = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.last = tree_rss(self.pid)
            self.peak = max(self.peak, self.last)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last = tree_rss(self.pid)
        self.peak = max(self.peak, self.last)


class ServerProcess:
    """``python <argv>`` with ``{port}`` filled in, on a free loopback port; stopped by :meth:`stop`."""

    def __init__(self, argv: list[str], env: dict[str, str], ready_path: str, cwd: Path | None = None,
                 timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="convserve-bench-", suffix=".log", delete=False)
        argv = [sys.executable, *[a.replace("{port}", str(self.port)) for a in argv]]
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=cwd)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{argv} exited; log: {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2) as r:
                    if r.status < 500:
                        return
            except Exception:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{argv} not ready in {timeout:.0f} s; log: {self.log.name}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_service(env: dict[str, str]) -> ServerProcess:
    """``bentoml serve`` of this checkout (the shipped models unless ``env`` says otherwise),
    with a BENTOML_HOME and a gRPC port of its own (loopback)."""
    return ServerProcess(["-m", "bentoml", "serve", "service.service:ConvServe", "--host", "127.0.0.1", "--port",
                          "{port}"],
                         {"BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-home-"), "BENTOML_DO_NOT_TRACK": "true",
                          "CONVSERVE_GRPC_PORT": str(free_port()), "CONVSERVE_GRPC_HOST": "127.0.0.1", **env},
                         "/readyz")


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """--url, --server-pid and --env: the options :func:`service_at` takes."""
    parser.add_argument("--url", help="a running service instead of starting one on the shipped models")
    parser.add_argument("--server-pid", type=int, help="its main process, for memory")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service this starts")


@contextmanager
def service_at(url: str | None, pid: int | None, env: list[str]) -> Iterator[tuple[str, int | None]]:
    """(url, main pid) of the service to load: the one at ``url`` (with ``pid``, for memory),
    or one started here with ``env`` (KEY=VALUE strings) and stopped afterwards."""
    if url:
        yield url, pid
        return
    server = start_service(dict(kv.split("=", 1) for kv in env))
    try:
        yield server.url, server.pid
    finally:
        server.stop()
