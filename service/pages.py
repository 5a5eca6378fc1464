"""The pages people land on: convserve's API page at / and its OpenAPI document at /docs.json.

BentoML's stock page says "This is a Machine Learning Service created with BentoML",
versions the service "None", lists BentoML's team as the contact and asks the internet
(validator.swagger.io) for a badge. :class:`PagesMiddleware` answers ``GET /`` with
service/static/index.html (the Swagger UI files BentoML ships, served locally, and links
to the playground, /models and the v2 protocol; nothing from the internet) and rewrites
the ``info`` of ``GET /docs.json`` (title, version, description, no contact).

Every answer under those paths, the playground (/playground, starlette's StaticFiles) and
BentoML's Swagger UI files (/static_content/) carries :func:`page_headers`: no MIME sniffing,
no framing (clickjacking), no Referer to other sites, and a Content-Security-Policy that lets
the pages load only their own files: scripts and styles from the service itself (the API
page's one inline script and style by their SHA-256), images also from data: and blob: URLs
(the playground draws the upload and the answer's PNGs), requests to the service only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from core import __version__
from service.errors import send_response

INDEX = Path(__file__).resolve().parent / "static" / "index.html"
HEADED_PATHS = frozenset({"/", "/docs.json"})
HEADED_PREFIXES = ("/playground", "/static_content/")  # the playground's files; the Swagger UI's
DESCRIPTION = """Classification, detection, segmentation and keypoint CNNs on ONNX Runtime (CPU or CUDA).

- **Task endpoints**: `POST /classify`, `/detect`, `/segment`, `/keypoints`, `/embed` take an image (multipart
  field `image`, or the image as the body) and answer labels, boxes in original pixels, masks (COCO RLE, polygons
  or a PNG), boxes with named keypoints, or an L2-normalised embedding; `render=png` (or `Accept: image/png`)
  answers the annotated image instead.
- **Open Inference Protocol v2** under `/v2` for tritonclient and KServe clients: encoded images as a BYTES tensor,
  or the model's UINT8 tensor; JSON or binary tensor data.
- `GET /models` lists every model with its contract; `/playground` tries them in the browser.
- Errors are JSON (`{"error": {"type", "message"}}`, and `{"error": "..."}` under /v2) with a 4xx status for
  anything the client can fix.
"""


def _inline_hashes(html: bytes, tag: str) -> list[str]:
    """CSP source expressions ('sha256-...') for the contents of every inline ``<tag>`` in
    ``html`` (elements with a ``src`` load a file instead, and are not hashed)."""
    blocks = re.findall(rb"<" + tag.encode() + rb">(.*?)</" + tag.encode() + rb">", html, re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks]


def page_headers(index: bytes) -> list[tuple[bytes, bytes]]:
    """The security headers of the pages (see the module docstring); ``index`` is the API
    page as served, whose inline script and style the policy allows by hash."""
    csp = "; ".join([
        "default-src 'none'",
        " ".join(["script-src 'self'", *_inline_hashes(index, "script")]),
        " ".join(["style-src 'self'", *_inline_hashes(index, "style")]),
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]


def _headed(path: str) -> bool:
    return path in HEADED_PATHS or path.startswith(HEADED_PREFIXES)


class PagesMiddleware:
    """ASGI middleware serving / and rewriting /docs.json, and giving the pages their security
    headers (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.index = INDEX.read_bytes().replace(b"{{version}}", __version__.encode())
        self.headers = page_headers(self.index)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _headed(scope["path"]):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD") or scope["path"] not in HEADED_PATHS:
            await self.app(scope, receive, self._with_headers(send))
            return
        if scope["path"] == "/":
            await send_response(send, 200, self.index, b"text/html; charset=utf-8", self.headers)
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body = json.dumps(rewrite_spec(json.loads(body))).encode()
        await send_response(send, start.get("status", 500), body, b"application/json", self.headers)

    def _with_headers(self, send: Any) -> Any:
        """``send`` with the pages' headers added to the answer's start."""
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        return send_with_headers


def rewrite_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """convserve's title, version and description in BentoML's generated document."""
    spec["info"] = {"title": "convserve", "version": __version__, "description": DESCRIPTION}
    return spec
