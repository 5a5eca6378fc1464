"""Closed-loop HTTP load with wrk (Debian's ``wrk``): a C load generator that costs the server
almost nothing, driving multipart image uploads, with latency percentiles and error counts.

One wrk thread keeps ``connections`` keep-alive connections busy, each sending the next
request as soon as its answer arrives, cycling through pre-built request bodies. The Lua
script (written here) reports p50/p90/p99/p99.9/max latency, requests, non-2xx answers
and socket errors as one JSON line. Load goes only to the URL given.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

LUA = r"""
local bodies, i = {}, 0
local content_type = os.getenv("WRK_CONTENT_TYPE")
init = function(args)
  local dir, n = os.getenv("WRK_BODY_DIR"), tonumber(os.getenv("WRK_BODIES"))
  for k = 1, n do
    local f = assert(io.open(dir .. "/" .. (k - 1) .. ".body", "rb"))
    bodies[k] = f:read("*all")
    f:close()
  end
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = content_type}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f,"non_2xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, e.status, e.connect, e.read, e.write, e.timeout))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def multipart(image: bytes, fields: dict[str, str], boundary: str) -> bytes:
    """A multipart/form-data body: the image in ``image``, then the option fields."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n"]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in fields.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


@dataclass
class Bodies:
    """Request bodies on disk for the Lua script, and their Content-Type."""

    folder: Path
    count: int
    content_type: str


def write_bodies(images: list[bytes], fields: dict[str, str], folder: Path | None = None) -> Bodies:
    folder = folder or Path(tempfile.mkdtemp(prefix="convserve-wrk-"))
    folder.mkdir(parents=True, exist_ok=True)
    boundary = uuid.uuid4().hex
    for i, img in enumerate(images):
        (folder / f"{i}.body").write_bytes(multipart(img, fields, boundary))
    return Bodies(folder, len(images), f"multipart/form-data; boundary={boundary}")


def run(url: str, bodies: Bodies, connections: int, seconds: float, timeout_s: float = 30.0) -> dict[str, float]:
    """Load ``url`` for ``seconds`` with ``connections`` connections; wrk's figures in ms, plus
    req/s, ok/s (2xx) and the CPU seconds wrk itself used."""
    script = bodies.folder / "bench.lua"
    script.write_text(LUA)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={int(timeout_s)}s",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + timeout_s + 60,
        env={"WRK_BODY_DIR": str(bodies.folder), "WRK_BODIES": str(bodies.count),
             "WRK_CONTENT_TYPE": bodies.content_type, "PATH": "/usr/bin:/bin"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    secs = raw["duration_us"] / 1e6
    ms = {k.replace("_us", "_ms"): raw[k] / 1000 for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us")}
    socket_errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    return {"connections": connections, "seconds": round(secs, 2), "requests": raw["requests"],
            "req_s": raw["requests"] / secs, "ok_s": (raw["requests"] - raw["non_2xx"]) / secs,
            "non_2xx": raw["non_2xx"], "socket_errors": socket_errors, **ms,
            "client_cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)}
