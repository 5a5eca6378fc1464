"""Service throughput against the in-process ceiling, in one run on one machine.

Usage (see README "Benchmark")::

    python -m loadtest.benchmark                      # starts the service and the baseline here
    python -m loadtest.benchmark --url http://127.0.0.1:3000 --no-naive   # a running container

(a) ceiling: the service's own decode + resize + ONNX Runtime code, in process, no HTTP,
    batches of CONVSERVE_MAX_BATCH, the same thread settings; also ONNX Runtime alone on
    already-prepared inputs. (b) the service over HTTP at rising concurrency (one persistent
    connection per client thread) until throughput stops rising. (c) the naive baseline
    (loadtest/naive_server.py: FastAPI + ORT, one image per call) at the same concurrencies.

Prints a Markdown table per endpoint and a JSON line. Every loop is bounded by --requests
and --max-seconds; load goes to the given URLs only (loopback by default).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from core.imaging import load_input
from core.onnx_contract import read_contract
from core.repository import discover
from core.runtime import OnnxModel
from core.tasks import BY_ENDPOINT
from service.settings import Settings
from training.synthetic import render_scene


def make_images(count: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """JPEG scenes of the given size (several shapes on a textured background)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = render_scene(rng, width, height, 3, 0.08 * min(width, height), 0.25 * min(width, height)).image
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ceiling(model: OnnxModel, images: list[bytes], settings: Settings, seconds: float) -> dict[str, float]:
    """img/s of decode+resize+ORT in batches, and of ORT alone, in this process."""
    bs = min(settings.max_batch, model.contract.batch.max_size or settings.max_batch)

    def prep(data: bytes) -> np.ndarray:
        return load_input(data, model.contract.input, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)[1]

    prepared = np.stack([prep(d) for d in images[:bs]])
    model.run(prepared)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.run(prepared)
        n += len(prepared)
    ort_only = n / (time.perf_counter() - t0)
    n, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        batch = np.stack([prep(images[(i + k) % len(images)]) for k in range(bs)])
        model.run(batch)
        n, i = n + bs, i + bs
    return {"ort_only_img_s": ort_only, "pipeline_img_s": n / (time.perf_counter() - t0), "batch": bs}


def _multipart(data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="i.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def load(url: str, endpoint: str, images: list[bytes], concurrency: int, requests: int, max_seconds: float) -> dict[str, float]:
    """Closed-loop load: ``concurrency`` clients, ``requests`` in all (or until max_seconds)."""
    u = urlparse(url)
    bodies = [_multipart(d) for d in images]
    lock, latencies, errors = threading.Lock(), [], {"n": 0}
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/{endpoint}", body, {"Content-Type": ctype})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    errors["n"] += 1
        conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "ok": len(lat), "errors": errors["n"], "req_s": len(lat) / wall,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan")}


class _Process:
    """A server subprocess on a free loopback port, stopped on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], ready_path: str) -> None:
        import os
        import socket
        import subprocess
        import sys
        import tempfile
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="convserve-bench-", suffix=".log", delete=False)
        argv = [sys.executable, *[a.replace("{port}", str(self.port)) for a in argv]]
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 180
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
        raise SystemExit(f"{argv} not ready in 180 s; log: {self.log.name}")

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def sweep(url: str, endpoint: str, images: list[bytes], levels: list[int], requests: int,
          max_seconds: float) -> list[dict[str, float]]:
    """Load at each concurrency until throughput stops rising (< 5% over the best so far)."""
    rows: list[dict[str, float]] = []
    for c in levels:
        rows.append(load(url, endpoint, images, c, requests, max_seconds))
        best = max(r["req_s"] for r in rows[:-1]) if len(rows) > 1 else 0.0
        if len(rows) > 2 and rows[-1]["req_s"] < 1.05 * best:
            break
    return rows


def main(argv: list[str] | None = None) -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service (e.g. a container); default: start one here")
    p.add_argument("--naive-url", help="a running naive baseline; default: start one here (unless --no-naive)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive FastAPI baseline")
    p.add_argument("--endpoints", default="classify,detect,segment")
    p.add_argument("--model-root", type=Path, help="model repository (default: the service's default)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="levels, stopping when throughput stops rising")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap per concurrency level")
    p.add_argument("--ceiling-seconds", type=float, default=5.0)
    p.add_argument("--image-size", default="640x480")
    p.add_argument("--json-out", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    w, h = (int(v) for v in a.image_size.split("x"))
    images = make_images(16, w, h)
    settings = Settings.from_env()
    root = a.model_root or settings.model_root
    levels = [int(c) for c in a.concurrency.split(",")]
    started: list[_Process] = []
    try:
        url = a.url
        if not url:
            home = tempfile.mkdtemp(prefix="bentoml-home-")
            started.append(_Process(["-m", "bentoml", "serve", "service.service:ConvServe", "--host", "127.0.0.1",
                                     "--port", "{port}"], {"CONVSERVE_MODEL_ROOT": str(root), "BENTOML_HOME": home,
                                                           "BENTOML_DO_NOT_TRACK": "true"}, "/readyz"))
            url = started[-1].url
        naive_url = a.naive_url
        if not naive_url and not a.no_naive:
            started.append(_Process(["-m", "loadtest.naive_server", "--port", "{port}", "--model-root", str(root)],
                                    {}, "/docs"))
            naive_url = started[-1].url
        results = []
        found = discover(root)
        for endpoint in a.endpoints.split(","):
            task = BY_ENDPOINT[endpoint].name
            entry = next(e for e in found if read_contract(e.path).task == task)
            name, version = entry.name, entry.version
            model = OnnxModel.load(entry.path, name, version, settings.device, settings.ort_threads)
            ceil = ceiling(model, images, settings, a.ceiling_seconds)
            rows = sweep(url, endpoint, images, levels, a.requests, a.max_seconds)
            naive = [load(naive_url, endpoint, images, int(r["concurrency"]), a.requests, a.max_seconds)
                     for r in rows] if naive_url else []
            results.append({"endpoint": endpoint, "model": f"{name}:{version}", "ceiling": ceil, "service": rows,
                            "naive": naive})
            print(f"\n/{endpoint} on {name}:{version}, {w}x{h} JPEG, ORT threads {settings.ort_threads}: "
                  f"ceiling {ceil['pipeline_img_s']:.1f} img/s (decode+resize+ORT, batch {ceil['batch']}), "
                  f"ORT alone {ceil['ort_only_img_s']:.1f} img/s")
            print("| concurrency | service req/s | p50 ms | p99 ms | naive req/s | naive p50 ms | naive p99 ms "
                  "| service / ceiling | service / naive |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for i, r in enumerate(rows):
                n = naive[i] if naive else None
                nv = (f"{n['req_s']:.1f} | {n['p50_ms']:.1f} | {n['p99_ms']:.1f}" if n else "- | - | -")
                ratio = f"{r['req_s'] / n['req_s']:.2f}" if n and n["req_s"] else "-"
                print(f"| {r['concurrency']} | {r['req_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {nv} | "
                      f"{r['req_s'] / ceil['pipeline_img_s']:.2f} | {ratio} |")
        if a.json_out:
            a.json_out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results))
    finally:
        for proc in started:
            proc.stop()


if __name__ == "__main__":
    main()
