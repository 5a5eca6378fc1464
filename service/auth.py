"""Optional API keys: who may use the service.

Off unless ``CONVSERVE_API_KEYS`` (or ``CONVSERVE_API_KEYS_FILE``) holds keys. Then every
route except the open ones needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``:

- open: the API page (/), the OpenAPI document (/docs.json), the playground's files;
- health (/livez, /readyz, /v2/health/*) and /metrics: open, or closed too with
  ``CONVSERVE_AUTH_HEALTH=1`` (then probes and scrapers send a key);
- admin (/admin/...): only ``CONVSERVE_ADMIN_KEYS``; disabled (403) when none is set.
  Admin keys are accepted on every other route too.

Keys are compared in constant time (the SHA-256 digests of the key sent and of every
configured key, all compared with hmac.compare_digest, none skipped), and a refusal says
only that a valid key is needed: 401 with ``WWW-Authenticate: Bearer``, in the error shape
of the route (the v2 protocol's ``{"error": "..."}`` under /v2).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from service.errors import error_json, send_response

OPEN_PREFIXES = ("/static_content/", "/playground")
OPEN_PATHS = frozenset({"/", "/docs.json", "/favicon.ico"})
HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready"})
ADMIN_PREFIX = "/admin/"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Digests of the configured keys; :meth:`accepts` compares in constant time."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self.digests)

    def accepts(self, key: str | None) -> bool:
        sent = _digest(key or "")
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(sent, d)  # no early exit: every key is compared
        return ok and key is not None


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key in ``Authorization: Bearer`` or ``X-API-Key``, if any."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


class AuthMiddleware:
    """ASGI middleware enforcing the policy of the module docstring."""

    def __init__(self, app: Any, api_keys: tuple[str, ...] = (), admin_keys: tuple[str, ...] = (),
                 protect_health: bool = False) -> None:
        self.app = app
        self.users, self.admins = KeyRing(api_keys), KeyRing(admin_keys)
        self.protect_health = protect_health

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        refusal = self._refusal(path, scope["headers"])
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, type_, message = refusal
        headers = [(b"connection", b"close")]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="convserve"'))
        await send_response(send, status, error_json(type_, message, v2=path.startswith("/v2")), b"application/json",
                            headers)

    def _refusal(self, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, str, str] | None:
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        if path.startswith(ADMIN_PREFIX):
            if not self.admins:
                return 403, "forbidden", f"{path} is disabled: set CONVSERVE_ADMIN_KEYS to enable it"
            if self.admins.accepts(presented_key(headers)):
                return None
            return 401, "unauthorized", "this route needs an admin key: send Authorization: Bearer <key>"
        if not self.users or (path in HEALTH_PATHS and not self.protect_health):
            return None
        key = presented_key(headers)
        if self.users.accepts(key) or self.admins.accepts(key):
            return None
        return 401, "unauthorized", ("a valid API key is needed: send Authorization: Bearer <key> or X-API-Key: <key>")
