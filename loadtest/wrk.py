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
from typing import Any

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


# Mixed load: each line of WRK_MANIFEST is "path<TAB>content type<TAB>body file"; requests go
# round-robin through them. Every answer's status is counted, and 503s without Retry-After.
MIXED_LUA = r"""
local threads = {}
setup = function(thread)
  threads[#threads + 1] = thread
end
init = function(args)
  -- runs in each wrk thread's own Lua state: these globals are read back by done() via thread:get
  reqs, i, counts, no_retry = {}, 0, {}, 0
  for line in io.lines(os.getenv("WRK_MANIFEST")) do
    local path, ctype, file, extra = line:match("([^\t]+)\t([^\t]+)\t([^\t]+)\t?([^\t]*)")
    local f = assert(io.open(file, "rb"))
    local body = f:read("*all")
    f:close()
    local headers = {["Content-Type"] = ctype}
    local name, value = extra:match("([^:]+):%s*(.*)")
    if name then headers[name] = value end
    reqs[#reqs + 1] = wrk.format("POST", path, headers, body)
  end
end
delay = function()
  return tonumber(os.getenv("WRK_DELAY_MS") or "0")
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
response = function(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  if status == 503 and headers["Retry-After"] == nil and headers["retry-after"] == nil then
    no_retry = no_retry + 1
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  local total, missing = {}, 0
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do total[k] = (total[k] or 0) + v end
    missing = missing + t:get("no_retry")
  end
  local parts = {}
  for k, v in pairs(total) do parts[#parts + 1] = string.format('"%d":%d', k, v) end
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f,"non_2xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"status":{%s},"503_without_retry_after":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, e.status, e.connect, e.read, e.write, e.timeout,
    table.concat(parts, ","), missing))
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


@dataclass
class Mixed:
    """Requests of several kinds on disk for MIXED_LUA: (path, content type, body) lines."""

    folder: Path
    manifest: Path
    count: int


def write_mixed(requests: list[tuple[str, str, bytes]] | list[tuple[str, str, bytes, str]],
                folder: Path | None = None) -> Mixed:
    """``requests`` as (path, content type, body[, "Header-Name: value"]), written for
    :func:`run_mixed`."""
    folder = folder or Path(tempfile.mkdtemp(prefix="convserve-wrk-mixed-"))
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (path, ctype, body, *extra) in enumerate(requests):
        (folder / f"{i}.body").write_bytes(body)
        lines.append("\t".join([path, ctype, str(folder / f"{i}.body"), *extra]))
    manifest = folder / "manifest.tsv"
    manifest.write_text("\n".join(lines) + "\n")
    return Mixed(folder, manifest, len(requests))


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (wrk and servers it starts inherit
    it): thousands of connections need thousands of descriptors. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_mixed(url: str, mixed: Mixed, connections: int, seconds: float, delay_ms: float = 0.0,
              timeout_s: float = 30.0) -> dict[str, Any]:
    """:func:`run` with MIXED_LUA: every answer's status counted (``status``), and the 503s that
    came without Retry-After; ``delay_ms`` between a connection's answer and its next request."""
    script = mixed.folder / "mixed.lua"
    script.write_text(MIXED_LUA)
    return _wrk(url, script, connections, seconds, timeout_s, {"WRK_MANIFEST": str(mixed.manifest),
                                                               "WRK_DELAY_MS": str(int(delay_ms))})


def run(url: str, bodies: Bodies, connections: int, seconds: float, timeout_s: float = 30.0) -> dict[str, Any]:
    """Load ``url`` for ``seconds`` with ``connections`` connections; wrk's figures in ms, plus
    req/s, ok/s (2xx) and the CPU seconds wrk itself used."""
    script = bodies.folder / "bench.lua"
    script.write_text(LUA)
    return _wrk(url, script, connections, seconds, timeout_s, {
        "WRK_BODY_DIR": str(bodies.folder), "WRK_BODIES": str(bodies.count), "WRK_CONTENT_TYPE": bodies.content_type})


def _wrk(url: str, script: Path, connections: int, seconds: float, timeout_s: float, env: dict[str, str]
         ) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={int(timeout_s)}s",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + timeout_s + 60, env={**env, "PATH": "/usr/bin:/bin"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    secs = raw["duration_us"] / 1e6
    ms = {k.replace("_us", "_ms"): raw[k] / 1000
          for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us")}
    socket_errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    row = {"connections": connections, "seconds": round(secs, 2), "requests": raw["requests"],
           "req_s": raw["requests"] / secs, "ok_s": (raw["requests"] - raw["non_2xx"]) / secs,
           "non_2xx": raw["non_2xx"], "socket_errors": socket_errors, **ms,
           "client_cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)}
    if "status" in raw:
        row["status"] = {int(k): v for k, v in raw["status"].items()}
        row["503_without_retry_after"] = raw["503_without_retry_after"]
    return row
