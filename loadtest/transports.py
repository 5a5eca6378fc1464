"""REST multipart, REST v2 binary and gRPC side by side on the same images, and gRPC streams.

For each model and client count, three closed-loop loads of the same 640x480 JPEG, one
after the other on one server, each from a C load generator of its own process: ``POST
/<task endpoint>`` multipart (wrk), ``POST /v2/models/<name>/infer`` with the binary tensor
extension (wrk; the image as BYTES [1], the outputs as binary), and gRPC ModelInfer (h2load,
Debian's nghttp2-client: the request framed once). Then 1..4 concurrent ModelStreamInfer
streams of 640x480 frames (loadtest.grpc_load: grpcio's client, frames serialised once).
Each level runs ``--rounds`` times per transport, the order rotated each round; the median
round is reported with the range. Reported: req/s, p50, p99, the CPU seconds the load
generator used (it shares the machine) and the server's.

    python -m loadtest.transports --json-out transports.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from loadtest import wrk
from loadtest.benchmark import make_images
from loadtest.processes import free_port, service_at


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _tree_cpu(pid: int | None) -> float:
    """CPU seconds so far of ``pid`` and its descendants (0 without a pid)."""
    if not pid:
        return 0.0
    total = 0.0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def v2_binary(input_name: str, image: bytes) -> tuple[bytes, str]:
    """A v2 infer body with the binary tensor extension, and its Inference-Header-Content-Length header."""
    import struct

    element = struct.pack("<I", len(image)) + image
    header = json.dumps({"inputs": [{"name": input_name, "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + element, f"Inference-Header-Content-Length: {len(header)}"


def _answered_grpc(url: str) -> float:
    """gRPC calls the service answered with OK so far (convserve_request_seconds, endpoint grpc)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("convserve_request_seconds_count{") and 'endpoint="grpc"' in line)


def h2load_grpc(url: str, target: str, model: str, input_name: str, image: bytes, clients: int, seconds: float,
                folder: Path) -> dict[str, Any]:
    """Unary ModelInfer calls from h2load (nghttp2's C load generator, as cheap as wrk): the
    request framed once as gRPC's length-prefixed message, ``clients`` HTTP/2 connections with
    one call in flight each. h2load sees HTTP statuses only, and gRPC errors come as 200 with a
    grpc-status trailer: the calls the service answered OK (its own counter) must equal h2load's."""
    import resource

    from loadtest.grpc_load import infer_request

    message = infer_request(model, input_name, image)
    body = folder / f"{model}.grpc"
    body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    log = folder / f"{model}-{clients}.h2log"
    log.unlink(missing_ok=True)  # h2load appends to it
    answered = _answered_grpc(url)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["h2load", "-c", str(clients), "-m", "1", "-D", str(max(1, round(seconds))), "-d", str(body),
                          "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
                          f"http://{target}/inference.GRPCInferenceService/ModelInfer"],
                         capture_output=True, text=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed ({out.returncode}): {out.stdout[-800:]} {out.stderr[-800:]}")
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    ok = np.array([int(r[2]) for r in rows if r[1] == "200"]) / 1e3
    started = [int(r[0]) for r in rows]
    elapsed = (max(s + int(r[2]) for s, r in zip(started, rows)) - min(started)) / 1e6 if rows else seconds
    errors = len(rows) - len(ok) + max(0, len(ok) - round(_answered_grpc(url) - answered))
    return {"concurrency": clients, "seconds": round(elapsed, 2), "requests": len(rows), "errors": errors,
            "req_s": len(ok) / elapsed, "p50_ms": float(np.percentile(ok, 50)), "p99_ms": float(np.percentile(ok, 99)),
            "client_cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)}


def grpc_load(target: str, model: str, input_name: str, images: Path, mode: str, concurrency: int, seconds: float,
              window: int = 4) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "loadtest.grpc_load", "--target", target, "--model", model, "--input-name", input_name,
         "--images", str(images), "--mode", mode, "--concurrency", str(concurrency), "--seconds", str(seconds),
         "--window", str(window)], capture_output=True, text=True, timeout=seconds + 120)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("GRPC_JSON ")), None)
    if line is None:
        raise RuntimeError(f"grpc_load failed ({out.returncode}): {out.stderr[-1500:]}")
    return json.loads(line.removeprefix("GRPC_JSON "))


def _row(transport: str, model: str, r: dict[str, Any], server_cpu: float) -> dict[str, Any]:
    errors = r.get("errors", r.get("non_2xx", 0) + r.get("socket_errors", 0))
    return {"model": model, "transport": transport, "clients": r.get("concurrency", r.get("connections")),
            "req_s": round(r["req_s"], 1), "p50_ms": round(r["p50_ms"], 1), "p99_ms": round(r["p99_ms"], 1),
            "errors": errors, "client_cpu_s": r["client_cpu_s"], "server_cpu_s": round(server_cpu, 1),
            "seconds": r["seconds"]}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median req/s (its p50/p99 and CPU with it), and how many rounds."""
    chosen = sorted(runs, key=lambda r: r["req_s"])[len(runs) // 2]
    return {**chosen, "rounds": len(runs), "req_s_range": [min(r["req_s"] for r in runs),
                                                          max(r["req_s"] for r in runs)]}


def bench(url: str, grpc_target: str, pid: int | None, models: list[str], levels: list[int], streams: list[int],
          stream_model: str, seconds: float, window: int, rounds: int) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="convserve-transports-"))
    images = make_images(16, 640, 480)
    for i, img in enumerate(images):
        (folder / f"{i:02d}.jpg").write_bytes(img)
    described = {m["name"]: m for m in _get(url + "/models")["models"]}
    rows = []
    for name in models:
        endpoint = described[name]["endpoint"].lstrip("/")
        input_name = _get(f"{url}/v2/models/{name}")["inputs"][0]["name"]
        # One image for every transport: h2load sends one body.
        multipart = wrk.write_bodies(images[:1], {"model": name}, folder / f"{name}-multipart")
        binary = wrk.write_mixed([(f"/v2/models/{name}/infer", "application/octet-stream",
                                   *v2_binary(input_name, images[0]))], folder / f"{name}-v2")
        loads = {
            "REST multipart": lambda c, e=endpoint, b=multipart: wrk.run(f"{url}/{e}", b, c, seconds),
            "REST v2 binary": lambda c, b=binary: wrk.run_mixed(url, b, c, seconds),
            "gRPC": lambda c, n=name, i=input_name: h2load_grpc(url, grpc_target, n, i, images[0], c, seconds, folder),
        }
        for load in loads.values():  # warm every path once
            load(1)
        for clients in levels:
            runs: dict[str, list[dict[str, Any]]] = {t: [] for t in loads}
            order = list(loads)
            for k in range(rounds):  # each round in another order: the machine's drift hits every transport
                for transport in order[k % len(order):] + order[:k % len(order)]:
                    cpu = _tree_cpu(pid)
                    r = loads[transport](clients)
                    runs[transport].append(_row(transport, name, r, _tree_cpu(pid) - cpu))
                    print(json.dumps(runs[transport][-1]), flush=True)
            rows += [_median(runs[t]) for t in loads]
    input_name = _get(f"{url}/v2/models/{stream_model}")["inputs"][0]["name"]
    for n in streams:
        cpu = _tree_cpu(pid)
        r = grpc_load(grpc_target, stream_model, input_name, folder, "stream", n, seconds, window)
        row = _row("gRPC stream", stream_model, r, _tree_cpu(pid) - cpu)
        row["fps_per_stream"] = round(r["req_s"] / n, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | transport | clients | req/s (range) | p50 ms | p99 ms | errors | client CPU s | server CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        clients = f"{r['clients']} streams" if r["transport"] == "gRPC stream" else r["clients"]
        if "fps_per_stream" in r:
            rate = f"{r['req_s']} ({r['fps_per_stream']} fps/stream)"
        else:
            rate = f"{r['req_s']} ({r['req_s_range'][0]}-{r['req_s_range'][1]})"
        lines.append(f"| {r['model']} | {r['transport']} | {clients} | {rate} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['errors']} | {r['client_cpu_s']} | {r['server_cpu_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service (with --grpc-target) instead of starting one")
    p.add_argument("--grpc-target", help="host:port of that service's gRPC port")
    p.add_argument("--server-pid", type=int, help="its main process, for the server's CPU")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service this starts")
    p.add_argument("--models", default="shapes-classifier,shapes-detector")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--streams", default="1,2,4")
    p.add_argument("--stream-model", default="shapes-detector")
    p.add_argument("--window", type=int, default=4, help="frames in flight per stream")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3, help="per level and transport; the median round is reported")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    wrk.raise_fd_limit()
    port = free_port()
    env = a.env if a.url else [*a.env, f"CONVSERVE_GRPC_PORT={port}"]
    with service_at(a.url, a.server_pid, env) as (url, pid):
        target = a.grpc_target or f"127.0.0.1:{port}"
        rows = bench(url, target, pid, a.models.split(","), [int(c) for c in a.concurrency.split(",")],
                     [int(s) for s in a.streams.split(",")], a.stream_model, a.seconds, a.window, a.rounds)
    print(table(rows))
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
