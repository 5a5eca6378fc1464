"""A tiny HTTP client on the standard library, and the one multipart/form-data builder."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
import uuid
from typing import Any
from urllib.parse import urlparse

Response = tuple[int, dict[str, str], Any]

BOUNDARY = "testboundary"  # multipart_body's, unless it is given another
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}  # the headers for such a body


def multipart_body(parts: list[tuple[str, str | None, bytes]], boundary: str = BOUNDARY,
                   file_type: str | None = None, close: bool = True) -> bytes:
    """A multipart/form-data body from (name, filename or None, data) parts, written out by hand.
    ``file_type`` is sent as the Content-Type of the parts that have a filename; ``close=False``
    leaves out the closing boundary (a body cut short)."""
    out = b""
    for name, filename, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if filename is not None:
            head += f'; filename="{filename}"'
            if file_type is not None:
                head += f"\r\nContent-Type: {file_type}"
        out += f"{head}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode() if close else out


def post(url: str, files: dict[str, tuple[str, bytes]] | None = None, fields: dict[str, str] | None = None,
         timeout: float = 60, headers: dict[str, str] | None = None) -> Response:
    """multipart/form-data POST (the fields, then the files); returns (status, headers, parsed JSON or raw text)."""
    boundary = uuid.uuid4().hex
    parts = [(name, None, str(value).encode()) for name, value in (fields or {}).items()]
    parts += [(name, filename, data) for name, (filename, data) in (files or {}).items()]
    body = multipart_body(parts, boundary, file_type="application/octet-stream")
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                          **(headers or {})})
    return _send(req, timeout)


def get(url: str, timeout: float = 30, headers: dict[str, str] | None = None) -> Response:
    return _send(urllib.request.Request(url, headers=headers or {}), timeout)


def request(url: str, method: str, path: str, body: Any = b"", headers: dict[str, str] | None = None,
            chunked: bool = False, timeout: float = 60) -> Response:
    """Any request through http.client; ``chunked`` sends ``body`` (an iterable of bytes) with
    Transfer-Encoding: chunked and no Content-Length."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        status, resp_headers, raw = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
    return status, resp_headers, _parsed(raw)


def raw_exchange(url: str, data: bytes, timeout: float = 30) -> Response:
    """Send ``data`` as-is on a new connection (a hand-made request); parse the first response."""
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


def _send(req: urllib.request.Request, timeout: float) -> Response:
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
