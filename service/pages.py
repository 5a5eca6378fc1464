"""The pages people land on: convserve's API page at / and its OpenAPI document at /docs.json.

BentoML's stock page says "This is a Machine Learning Service created with BentoML",
versions the service "None", lists BentoML's team as the contact and asks the internet
(validator.swagger.io) for a badge. :class:`PagesMiddleware` answers ``GET /`` with
service/static/index.html (the Swagger UI files BentoML ships, served locally, and links
to the playground, /models and the v2 protocol; nothing from the internet) and rewrites
the ``info`` of ``GET /docs.json`` (title, version, description, no contact).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core import __version__
from service.errors import send_response

INDEX = Path(__file__).resolve().parent / "static" / "index.html"
DESCRIPTION = """Classification, detection and segmentation CNNs on ONNX Runtime (CPU or CUDA).

- **Task endpoints**: `POST /classify`, `/detect`, `/segment`, `/embed` take an image (multipart field `image`, or
  the image as the body) and answer labels, boxes in original pixels, masks (COCO RLE, polygons or a PNG) or an
  L2-normalised embedding; `render=png` (or `Accept: image/png`) answers the annotated image instead.
- **Open Inference Protocol v2** under `/v2` for tritonclient and KServe clients: encoded images as a BYTES tensor,
  or the model's UINT8 tensor; JSON or binary tensor data.
- `GET /models` lists every model with its contract; `/playground` tries them in the browser.
- Errors are JSON (`{"error": {"type", "message"}}`, and `{"error": "..."}` under /v2) with a 4xx status for
  anything the client can fix.
"""


class PagesMiddleware:
    """ASGI middleware serving / and rewriting /docs.json (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.index = INDEX.read_bytes().replace(b"{{version}}", __version__.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or scope["path"] not in ("/", "/docs.json"):
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/":
            await send_response(send, 200, self.index, b"text/html; charset=utf-8")
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
        await send_response(send, start.get("status", 500), body, b"application/json")


def rewrite_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """convserve's title, version and description in BentoML's generated document."""
    spec["info"] = {"title": "convserve", "version": __version__, "description": DESCRIPTION}
    return spec
