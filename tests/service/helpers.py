"""Synthetic request images with known content, and a tiny HTTP client on urllib."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import numpy as np
from PIL import Image

from training.synthetic import Scene, render_scene


def jpeg(img: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def scene(seed: int, width: int = 320, height: int = 240, shapes: int = 4) -> Scene:
    rng = np.random.default_rng(seed)
    m = min(width, height)
    return render_scene(rng, width, height, shapes, 0.08 * m, 0.2 * m)


def post(url: str, files: dict[str, tuple[str, bytes]] | None = None, fields: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    """multipart/form-data POST; returns (status, headers, parsed JSON or raw text)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return _send(req, timeout)


def get(url: str, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    return _send(urllib.request.Request(url), timeout)


def _send(req: urllib.request.Request, timeout: float) -> tuple[int, dict[str, str], Any]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    return status, headers, _parsed(raw)


def _parsed(raw: bytes) -> Any:
    """A response body as JSON, or as text when it is not JSON, or as bytes (an image)."""
    try:
        return json.loads(raw)
    except ValueError:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def request(url: str, method: str, path: str, body: Any = b"", headers: dict[str, str] | None = None,
            chunked: bool = False, timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    """Any request through http.client; ``chunked`` sends ``body`` (an iterable of bytes) with
    Transfer-Encoding: chunked and no Content-Length."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        status, resp_headers, raw = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
    return status, resp_headers, _parsed(raw)


def raw_exchange(url: str, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """Send ``data`` as-is on a new connection (a hand-made request); parse the first response."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(data)
        raw = b""
        while True:
            head, sep, rest = raw.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                if len(rest) >= int(headers.get("content-length", 0)):
                    break
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    status = int(lines[0].split()[1])
    return status, headers, _parsed(rest[: int(headers.get("content-length", len(rest)))])


def multipart_body(parts: list[tuple[str, str | None, bytes]], boundary: str = "testboundary") -> bytes:
    """A multipart body from (name, filename or None, data) parts, written out by hand."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()
