"""The hostile mix: what an attacker sends, several at once, while a normal client measures.

Usage (README "Hostile clients")::

    python -m loadtest.hostile --seconds 30 --out hostile-results
    python -m loadtest.hostile --url http://127.0.0.1:3000 --server-pid PID

Two phases of ``--seconds`` each against one service (started here on the shipped models with
default settings, one worker, unless ``--url`` names one):

1. **quiet**: the normal client alone: wrk, one connection, 640x480 JPEGs to /classify;
2. **hostile**: the same client while ``--attackers`` threads cycle through :func:`cases`:
   wide-mode pixel bombs (16-bit PNG, float TIFF, both in one request, a lossless WebP, CAM on
   100 MP), floods of unknown paths, oversized and trickled request heads, v2 bodies of
   millions of elements, deep nesting and overflowing shapes, a log-forging path, and the
   requests that used to be 500s.

It reports, per phase, the normal client's p50/p99 and throughput and the server tree's peak
RSS, and for the hostile phase every status each case got (a 5xx or a hang is a failure),
whether the service still answers afterwards, and /metrics' size before and after. Load goes
only to the URL given; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from loadtest import wrk
from loadtest.processes import TreeMemory, add_service_arguments, service_at, tree_rss

MB = 1024 * 1024
Send = Callable[[str], int]  # base URL -> status (0: the connection was closed without an answer)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _multipart(parts: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = "hostileboundary"
    out = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\n'.encode()
                   + data + b"\r\n" for name, data in parts)
    out += b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in (fields or {}).items())
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _exchange(url: str, head: bytes, body: bytes = b"", timeout: float = 60.0, trickle_s: float = 0.0) -> int:
    """Send a hand-made request (``head`` without the final blank line is trickled one byte per
    ``trickle_s`` when set); the answer's status, 0 when the server closed without one."""
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
            if trickle_s:
                for b in head:
                    s.sendall(bytes([b]))
                    time.sleep(trickle_s)
            else:
                s.sendall(head + body)
            first = s.recv(64)
            return int(first.split(b" ", 2)[1]) if first.startswith(b"HTTP/") else 0
    except (OSError, ValueError, IndexError):
        return 0


def _post(path: str, body: bytes, content_type: str, extra: str = "") -> Send:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode()
    return lambda url: _exchange(url, head, body)


def _get(path: str) -> Send:
    return lambda url: _exchange(url, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())


def _unknown_paths(count: int) -> Send:
    """``count`` GETs to distinct unknown paths on one keep-alive connection; the worst status."""
    def send(url: str) -> int:
        import http.client

        u = urlparse(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        worst = 0
        try:
            for _ in range(count):
                conn.request("GET", f"/no-such-{np.random.randint(1 << 62):x}")
                r = conn.getresponse()
                r.read()
                worst = max(worst, r.status)
        except OSError:
            return 0
        finally:
            conn.close()
        return worst
    return send


def cases(model_input: tuple[str, int, int, int], classifier: str) -> dict[str, Send]:
    """Every hostile request by name (each a callable that sends one and returns its status)."""
    name, h, w, c = model_input
    wide = _png(Image.fromarray(np.zeros((10_000, 10_000), np.uint16)))  # 100 MP, 16-bit grey
    tiff_buf = io.BytesIO()
    Image.new("F", (10_000, 10_000)).save(tiff_buf, format="TIFF", compression="tiff_deflate")
    tiff = tiff_buf.getvalue()
    webp_buf = io.BytesIO()
    Image.new("RGB", (10_000, 10_000)).save(webp_buf, format="WEBP", lossless=True)
    rgb100 = _png(Image.new("RGB", (10_000, 10_000)))
    both, both_type = _multipart([("a.png", wide), ("b.tif", tiff)])
    cam, cam_type = _multipart([("a.png", rgb100)], {"cam": "true"})
    cam_render, cam_render_type = _multipart([("a.png", rgb100)], {"cam": "true", "render": "jpeg"})
    embed_render, er_type = _multipart([("a.png", _png(Image.new("RGB", (64, 64))))], {"render": "png"})
    n = 11_000_000
    json_bomb = (b'{"inputs":[{"name":"' + name.encode() + b'","datatype":"BYTES","shape":[' + str(n).encode()
                 + b'],"data":[""' + b',""' * (n - 1) + b"]}]}")
    bin_head = json.dumps({"inputs": [{"name": name, "datatype": "BYTES", "shape": [8_000_000],
                                       "parameters": {"binary_data_size": 32_000_000}}]}).encode()
    nested = json.dumps({"inputs": [{"name": name, "datatype": "BYTES", "shape": [1], "data": 0}]}).encode().replace(
        b'"data": 0', b'"data": ' + b"[" * 995 + b'"x"' + b"]" * 995)
    overflow_head = json.dumps({"inputs": [{"name": name, "datatype": "UINT8", "shape": [1125899906842625, h, w, c],
                                            "parameters": {"binary_data_size": h * w * c}}]}).encode()
    v2 = f"/v2/models/{classifier}/infer"
    return {
        "16-bit PNG 100 MP": _post("/classify", wide, "image/png"),
        "float TIFF 100 MP": _post("/classify", tiff, "image/tiff"),
        "both in one request": _post("/classify", both, both_type),
        "lossless WebP 100 MP": _post("/classify", webp_buf.getvalue(), "image/webp"),
        "cam=true on 100 MP": _post("/classify", cam, cam_type),
        "cam=true rendered, 100 MP": _post("/classify", cam_render, cam_render_type),
        "render on /embed": _post("/embed", embed_render, er_type),
        "2,000 unknown paths": _unknown_paths(2000),
        "1 MiB request head": lambda url: _exchange(
            url, b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * MB + b"\r\n\r\n"),
        "head trickled 1 B/s": lambda url: _exchange(url, b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40,
                                                     trickle_s=1.0, timeout=90),
        "v2 JSON 11 M elements": _post(v2, json_bomb, "application/json"),
        "v2 binary 8 M elements": _post(v2, bin_head + b"\0" * 32_000_000, "application/octet-stream",
                                        f"Inference-Header-Content-Length: {len(bin_head)}\r\n"),
        "v2 nested 995 deep": _post(v2, nested, "application/json"),
        "v2 shape overflow": _post(v2, overflow_head + bytes(h * w * c), "application/octet-stream",
                                   f"Inference-Header-Content-Length: {len(overflow_head)}\r\n"),
        "header length '²'": _post(v2, b"{}", "application/json", "Inference-Header-Content-Length: \xb2\r\n"),
        "log-forging path": _get("/x%0A2026-12-01T19:50:00+0000%20[INFO]%20FORGED"),
    }


def attack(url: str, sends: dict[str, Send], attackers: int, seconds: float) -> dict[str, Counter]:
    """``attackers`` threads cycling through ``sends`` for ``seconds``; statuses by case."""
    statuses: dict[str, Counter] = defaultdict(Counter)
    names = list(sends)
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def run(offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            name = names[i % len(names)]
            status = sends[name](url)
            with lock:
                statuses[name][status] += 1
            i += attackers

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(attackers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 180)
    return statuses


def _metrics_bytes(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        return len(r.read())


def _model_input(url: str) -> tuple[str, tuple[str, int, int, int]]:
    import urllib.request

    with urllib.request.urlopen(url + "/models", timeout=30) as r:
        models = json.loads(r.read())["models"]
    m = next(m for m in models if "/classify" in m["endpoints"])
    with urllib.request.urlopen(f"{url}/v2/models/{m['name']}", timeout=30) as r:
        meta = json.loads(r.read())
    i = m["input"]
    return m["name"], (meta["inputs"][0]["name"], i["height"], i["width"], i["channels"])


def run(url: str, pid: int | None, seconds: float, attackers: int, only: str = "") -> dict[str, Any]:
    classifier, model_input = _model_input(url)
    from loadtest.images import image_mix

    jpegs = [data for name, data, _ in image_mix(10, seed=3) if name.endswith(".jpg") and "640x480" in name]
    bodies = wrk.write_bodies(jpegs, {})
    sends = {k: v for k, v in cases(model_input, classifier).items()
             if not only or any(word in k for word in only.split(","))}
    out: dict[str, Any] = {"metrics_bytes_before": _metrics_bytes(url),
                           "rss_idle_mb": round(tree_rss(pid) / MB, 1) if pid else None}
    for phase in ("quiet", "hostile"):
        result: dict[str, Any] = {}
        thread = None
        if phase == "hostile":
            thread = threading.Thread(target=lambda found=result: found.update(
                statuses=attack(url, sends, attackers, seconds)), daemon=True)
            thread.start()
        if pid:
            with TreeMemory(pid, interval=0.05) as mem:
                normal = wrk.run(url + "/classify", bodies, 1, seconds)
                if thread:
                    thread.join(seconds + 240)
        else:
            normal = wrk.run(url + "/classify", bodies, 1, seconds)
            if thread:
                thread.join(seconds + 240)
        out[phase] = {"req_s": round(normal["req_s"], 1), "p50_ms": round(normal["p50_ms"], 1),
                      "p99_ms": round(normal["p99_ms"], 1), "normal_non_2xx": normal["non_2xx"],
                      "normal_socket_errors": normal["socket_errors"],
                      "rss_peak_mb": round(mem.peak / MB, 1) if pid else None}
        if phase == "hostile":
            out["cases"] = {k: dict(v) for k, v in result.get("statuses", {}).items()}
    out["serving_after"] = _exchange(url, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") == 200
    out["metrics_bytes_after"] = _metrics_bytes(url)
    out["hostile_5xx"] = sum(n for v in out.get("cases", {}).values() for s, n in v.items() if s >= 500)
    out["p99_ratio"] = round(out["hostile"]["p99_ms"] / max(out["quiet"]["p99_ms"], 1e-3), 2)
    return out


def table(result: dict[str, Any]) -> str:
    """The README's tables: the normal client in both phases, then every hostile case."""
    lines = ["| phase | normal req/s | p50 ms | p99 ms | peak RSS MB (server tree) |", "|---|---:|---:|---:|---:|"]
    for phase in ("quiet", "hostile"):
        r = result[phase]
        lines.append(f"| {phase} | {r['req_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['rss_peak_mb']} |")
    lines += ["", "| hostile case | answers (status: count; 0 = closed without an answer) |", "|---|---|"]
    for name, statuses in result["cases"].items():
        lines.append(f"| {name} | {', '.join(f'{s}: {n}' for s, n in sorted(statuses.items()))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    p.add_argument("--attackers", type=int, default=4, help="hostile requests in flight at once")
    p.add_argument("--only", default="", help="comma-separated words: only the cases whose name has one")
    add_service_arguments(p)
    p.add_argument("--out", type=Path, default=Path("hostile-results"))
    a = p.parse_args(argv)
    if not wrk.available():
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with service_at(a.url, a.server_pid, a.env) as (url, pid):
        result = run(url, pid, a.seconds, a.attackers, a.only)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "hostile.json").write_text(json.dumps(result, indent=1))
    (a.out / "hostile.md").write_text(table(result) + "\n")
    print(table(result))
    print(json.dumps({k: result[k] for k in ("hostile_5xx", "p99_ratio", "serving_after", "metrics_bytes_before",
                                             "metrics_bytes_after", "rss_idle_mb")}))


if __name__ == "__main__":
    main()
