"""The service against the in-process ceiling and a naive baseline, in one run on one machine.

Usage (see README "Benchmark")::

    python -m loadtest.benchmark --model-root models                 # every model, 1..32 clients
    python -m loadtest.benchmark --model-root bench-models --models resnet18 --concurrency 1,16
    python -m loadtest.benchmark --models shapes-classifier --overload 600 --seconds 60
    python -m loadtest.benchmark --url http://127.0.0.1:3000 --server-pid PID --no-naive   # a running server

For each model: (a) the ceiling: the service's own decode (core.imaging.load_input) in
CONVSERVE_DECODE_THREADS threads feeding CONVSERVE_INFERENCE_THREADS concurrent ONNX Runtime
runs that batch what is queued (up to the service's batch limit) and compute each answer
(the task's result), in process, no HTTP, the same threads; and ORT alone on prepared inputs.
(b) the service and (c) the naive baseline (loadtest/naive_server.py: FastAPI + ORT,
one image per call), each loaded by wrk (loadtest/wrk.py) at every concurrency with
640x480 JPEG uploads: req/s, p50/p90/p99/max, non-2xx and socket errors, the peak RSS of
the server's whole process tree, and each worker's CPU seconds. ``--overload N`` instead
holds N connections for ``--seconds`` and reports goodput, what was refused, the latency of
admitted requests (a one-connection probe beside wrk) and memory.

Prints a Markdown table per model and, with ``--json-out``, everything as JSON. Load goes
to loopback servers this command starts, or to the URLs given.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import psutil

from core.imaging import load_input
from core.repository import ModelEntry, discover
from core.runtime import OnnxModel
from core.tasks import TASKS
from loadtest import wrk
from loadtest.processes import ServerProcess, TreeMemory, tree_rss
from service.endpoints import TASK_ENDPOINTS
from service.settings import Settings
from training.synthetic import render_scene

MB = 1024 * 1024


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
    """img/s of the service's machinery without HTTP, in this process: CONVSERVE_DECODE_THREADS
    threads decoding (core.imaging.load_input) into a queue, CONVSERVE_INFERENCE_THREADS
    threads each running ONNX Runtime on whatever is queued (up to the batch limit) and
    computing each image's answer (the task's result with default options); and ORT alone,
    on prepared inputs, with the same runs at once."""
    wanted = settings.max_batch_for(model.providers)
    bs = min(wanted, model.contract.batch.max_size or wanted)
    task = TASKS[model.contract.task]
    options = task.defaults

    def prep(data: bytes) -> tuple[np.ndarray, Any]:
        _, arr, geometry = load_input(data, model.contract.input, max_bytes=settings.max_bytes,
                                      max_pixels=settings.max_pixels)
        return arr, geometry

    prepared = np.stack([prep(images[k % len(images)])[0] for k in range(bs)])
    model.infer(prepared)
    stop = threading.Event()
    done = [0] * settings.inference_threads

    def ort_alone(k: int) -> None:
        while not stop.is_set():
            model.infer(prepared)
            done[k] += len(prepared)

    def timed(workers: list[threading.Thread]) -> float:
        t0 = time.perf_counter()
        for t in workers:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in workers:
            t.join()
        return sum(done) / (time.perf_counter() - t0)

    ort_only = timed([threading.Thread(target=ort_alone, args=(k,)) for k in range(settings.inference_threads)])
    ready: queue.Queue = queue.Queue(maxsize=2 * bs * settings.inference_threads)
    stop, done = threading.Event(), [0] * settings.inference_threads

    def decode(k: int) -> None:
        i = k
        while not stop.is_set():
            item = prep(images[i % len(images)])
            i += settings.decode_threads
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def infer(k: int) -> None:
        while not stop.is_set():
            try:
                batch = [ready.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < bs:  # batch what is queued, like the service's batcher
                try:
                    batch.append(ready.get_nowait())
                except queue.Empty:
                    break
            outputs = model.infer(np.stack([arr for arr, _ in batch]))
            for out, (_, geometry) in zip(outputs, batch):  # each answer, as the service computes it
                task.result(out, geometry, model.contract, options)
            done[k] += len(batch)

    pipeline = timed([threading.Thread(target=decode, args=(k,)) for k in range(settings.decode_threads)]
                     + [threading.Thread(target=infer, args=(k,)) for k in range(settings.inference_threads)])
    return {"ort_only_img_s": ort_only, "pipeline_img_s": pipeline, "max_batch": bs,
            "decode_threads": settings.decode_threads, "inference_threads": settings.inference_threads,
            "ort_threads": settings.ort_threads}


def _worker_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each child of ``pid`` (the workers of a bentoml serve)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return {}
    out = {}
    for c in children:
        try:
            t = c.cpu_times()
            out[c.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def load_level(url: str, bodies: wrk.Bodies, connections: int, seconds: float, pid: int | None) -> dict[str, Any]:
    """One wrk run, with the server tree's RSS sampled throughout and per-worker CPU seconds."""
    before = _worker_cpu(pid) if pid else {}
    if pid:
        with TreeMemory(pid) as mem:
            row = wrk.run(url, bodies, connections, seconds)
        row["rss_peak_mb"] = round(mem.peak / MB, 1)
        row["rss_end_mb"] = round(mem.last / MB, 1)
        after = _worker_cpu(pid)
        row["worker_cpu_s"] = [round(after[p] - before.get(p, 0.0), 1) for p in sorted(after)]
    else:
        row = wrk.run(url, bodies, connections, seconds)
    return row


def probe(url: str, data: bytes, fields: dict[str, str], stop: threading.Event) -> dict[str, Any]:
    """One client sending back to back until ``stop``: latencies of its 200 answers, and counts."""
    u = urlparse(url)
    body = wrk.multipart(data, fields, "probeboundary")
    headers = {"Content-Type": "multipart/form-data; boundary=probeboundary"}
    ok: list[float] = []
    status: dict[int, int] = {}
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            conn.request("POST", u.path, body, headers)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            status[0] = status.get(0, 0) + 1
            continue
        status[resp.status] = status.get(resp.status, 0) + 1
        if resp.status == 200:
            ok.append((time.perf_counter() - t0) * 1e3)
        else:
            time.sleep(0.05)  # a refused probe retries soon, not in a tight loop
    conn.close()
    lat = sorted(ok)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"admitted": len(lat), "status": status, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": lat[-1] if lat else float("nan"), "mean_ms": statistics.fmean(lat) if lat else float("nan")}


def overload(url: str, bodies: wrk.Bodies, image: bytes, fields: dict[str, str], connections: int, seconds: float,
             pid: int | None) -> dict[str, Any]:
    """``connections`` clients for ``seconds`` beside a one-connection probe; every answer's
    status is counted, and the 503s that came without Retry-After."""
    rss_before = tree_rss(pid) if pid else 0
    stop = threading.Event()
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(probe(url, image, fields, stop)), daemon=True)
    t.start()
    u = urlparse(url)
    mixed = wrk.write_mixed([(u.path, bodies.content_type, (bodies.folder / f"{i}.body").read_bytes())
                             for i in range(bodies.count)])
    base = f"{u.scheme}://{u.netloc}"
    if pid:
        with TreeMemory(pid) as mem:
            row = wrk.run_mixed(base, mixed, connections, seconds)
        row["rss_peak_mb"], row["rss_end_mb"] = round(mem.peak / MB, 1), round(mem.last / MB, 1)
    else:
        row = wrk.run_mixed(base, mixed, connections, seconds)
    stop.set()
    t.join(90)
    row["probe"] = result
    row["rss_before_mb"] = round(rss_before / MB, 1)
    return row


def _fmt(r: dict[str, Any] | None) -> str:
    if not r:
        return "- | - | - | -"
    err = r["non_2xx"] + r["socket_errors"]
    return f"{r['req_s']:.1f} | {r['p50_ms']:.1f} / {r['p90_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.0f} | " \
           f"{err} | {r.get('rss_peak_mb', '-')}"


def report(name: str, ceil: dict[str, float], rows: list[dict[str, Any]], naive: list[dict[str, Any]]) -> None:
    best = max(r["ok_s"] for r in rows)
    print(f"\n### {name}: ceiling {ceil['pipeline_img_s']:.1f} img/s (ORT alone {ceil['ort_only_img_s']:.1f}); "
          f"service best {best:.1f} req/s = {best / ceil['pipeline_img_s']:.2f} of the ceiling\n")
    print("| clients | service req/s | p50 / p90 / p99 / max ms | errors | RSS MB | naive req/s | "
          "p50 / p90 / p99 / max ms | errors | RSS MB | req/s ratio | p99 ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        n = naive[i] if naive else None
        ratio = f"{r['ok_s'] / n['ok_s']:.2f} | {r['p99_ms'] / n['p99_ms']:.2f}" if n and n["ok_s"] else "- | -"
        print(f"| {r['connections']} | {_fmt(r)} | {_fmt(n)} | {ratio} |")


def _start_service(root: Path, env: list[str]) -> ServerProcess:
    import tempfile

    extra = dict(kv.split("=", 1) for kv in env)
    return ServerProcess(["-m", "bentoml", "serve", "service.service:ConvServe", "--host", "127.0.0.1",
                          "--port", "{port}"],
                         {"CONVSERVE_MODEL_ROOT": str(root), "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-home-"),
                          "BENTOML_DO_NOT_TRACK": "true", **extra}, "/readyz")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-root", type=Path, help="model repository (default: the service's default)")
    p.add_argument("--models", help="comma-separated model names (default: every model in the repository)")
    p.add_argument("--url", help="a running service instead of starting one")
    p.add_argument("--server-pid", type=int, help="its main process, for memory and per-worker CPU")
    p.add_argument("--naive-url", help="a running naive baseline instead of starting one")
    p.add_argument("--naive-pid", type=int)
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service this starts (repeatable)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--seconds", type=float, default=10.0, help="per concurrency level (or the overload)")
    p.add_argument("--warmup-seconds", type=float, default=3.0)
    p.add_argument("--ceiling-seconds", type=float, default=5.0)
    p.add_argument("--overload", type=int, help="hold this many connections instead of the sweep")
    p.add_argument("--overload-factor", type=float, help="instead of --overload: as many connections as offer this "
                   "many times the rate sustained at 16 clients (a refused request holds its connection for up to "
                   "--admission-wait-s)")
    p.add_argument("--admission-wait-s", type=float, default=1.0,
                   help="the server's CONVSERVE_ADMISSION_WAIT_MS / 1000")
    p.add_argument("--image-size", default="640x480")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    if not wrk.available():
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if a.overload or a.overload_factor:
        wrk.raise_fd_limit()  # thousands of connections; the service started below inherits the limit too
    w, h = (int(v) for v in a.image_size.split("x"))
    images = make_images(16, w, h)
    settings = Settings.from_env()
    root = a.model_root or settings.model_root
    entries = [e for e in discover(root) if not a.models or e.name in a.models.split(",")]
    levels = [int(c) for c in a.concurrency.split(",")]
    started: list[ServerProcess] = []
    results = []
    try:
        url, pid = a.url, a.server_pid
        if not url:
            started.append(_start_service(root, a.env))
            url, pid = started[-1].url, started[-1].pid
        naive_url, naive_pid = a.naive_url, a.naive_pid
        if not naive_url and not a.no_naive and not (a.overload or a.overload_factor):
            started.append(ServerProcess(["-m", "loadtest.naive_server", "--port", "{port}", "--model-root", str(root)],
                                         {}, "/docs"))
            naive_url, naive_pid = started[-1].url, started[-1].pid
        rss_ready = tree_rss(pid) / MB if pid else None
        for entry in entries:
            results.append(bench_model(entry, images, settings, url, pid, naive_url, naive_pid, levels, a))
        summary = {"service_rss_after_warmup_mb": round(rss_ready, 1) if rss_ready else None, "models": results}
        if a.json_out:
            a.json_out.write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    finally:
        for proc in started:
            proc.stop()


def bench_model(entry: ModelEntry, images: list[bytes], settings: Settings, url: str, pid: int | None,
                naive_url: str | None, naive_pid: int | None, levels: list[int], a: argparse.Namespace
                ) -> dict[str, Any]:
    model = OnnxModel.load(entry.path, entry.name, entry.version, settings.device, 1)  # one thread a run: the ceiling
    endpoint = TASK_ENDPOINTS[model.contract.task].name
    fields = {"model": entry.ref}
    bodies = wrk.write_bodies(images, fields)
    target, naive_target = f"{url}/{endpoint}", f"{naive_url}/{endpoint}" if naive_url else None
    wrk.run(target, bodies, max(levels), a.warmup_seconds)  # first batches of every size, lazy imports
    if a.overload or a.overload_factor:
        sustained = load_level(target, bodies, 16, a.seconds / 4, pid)
        connections = a.overload or max(16, round(a.overload_factor * sustained["ok_s"]
                                                  * (a.admission_wait_s + sustained["mean_ms"] / 1e3)))
        row = overload(target, bodies, images[0], fields, connections, a.seconds, pid)
        offered = row["req_s"] / sustained["ok_s"]
        print(f"\n### {entry.ref} under {connections} connections for {a.seconds:.0f} s: answered {row['req_s']:.1f} "
              f"req/s = {offered:.1f}x the {sustained['ok_s']:.1f} sustained at 16 clients; goodput {row['ok_s']:.1f} "
              f"req/s ({row['ok_s'] / sustained['ok_s']:.2f} of sustained); status {row['status']}, "
              f"{row['503_without_retry_after']} 503 without Retry-After, {row['socket_errors']} socket errors; "
              f"admitted probe p50/p99/max {row['probe']['p50_ms']:.0f}/{row['probe']['p99_ms']:.0f}/"
              f"{row['probe']['max_ms']:.0f} ms over {row['probe']['admitted']} requests; RSS {row['rss_before_mb']} "
              f"-> peak {row.get('rss_peak_mb')} MB")
        return {"model": entry.ref, "endpoint": endpoint, "sustained": sustained, "overload": row,
                "connections": connections, "offered_vs_sustained": round(offered, 2)}
    ceil = ceiling(model, images, settings, a.ceiling_seconds)
    del model
    rows = [load_level(target, bodies, c, a.seconds, pid) for c in levels]
    naive = []
    if naive_target:
        naive_bodies = wrk.write_bodies(images, fields)
        wrk.run(naive_target, naive_bodies, max(levels), a.warmup_seconds)
        naive = [load_level(naive_target, naive_bodies, c, a.seconds, naive_pid) for c in levels]
    report(entry.ref, ceil, rows, naive)
    return {"model": entry.ref, "endpoint": endpoint, "ceiling": ceil, "service": rows, "naive": naive}


if __name__ == "__main__":
    main()
