"""The pages people land on: convserve's own API page (nothing from the internet), the
OpenAPI document's info, and the playground's files."""

from __future__ import annotations

import re
import urllib.request

from core import __version__
from tests.support.http import get


def _text(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers["content-type"], r.read().decode()


def test_the_api_page_is_convserves_and_self_contained(server) -> None:
    status, ctype, html = _text(server.url + "/")
    assert status == 200 and ctype.startswith("text/html")
    assert "convserve" in html and __version__ in html and "BentoML" not in html
    assert 'href="./playground/"' in html and "validatorUrl: null" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing loaded from elsewhere
    for ref in re.findall(r"""(?:src|href)="\./([^"]+)\"""", html):
        assert get(f"{server.url}/{ref}")[0] == 200, ref


def test_the_openapi_document_describes_convserve(server) -> None:
    status, _, spec = get(server.url + "/docs.json")
    assert status == 200
    info = spec["info"]
    assert info["title"] == "convserve" and info["version"] == __version__ and "contact" not in info
    assert "/v2" in info["description"] and "playground" in info["description"]
    paths = set(spec["paths"])
    assert {"/classify", "/detect", "/segment", "/embed", "/models", "/v2", "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}/infer", "/v2/repository/index", "/admin/reload"} <= paths


def test_the_playground_is_served_by_the_service(server) -> None:
    status, ctype, html = _text(server.url + "/playground/")
    assert status == 200 and ctype.startswith("text/html") and "playground.js" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    status, ctype, js = _text(server.url + "/playground/playground.js")
    assert status == 200 and "javascript" in ctype and "fetch(" in js and "http://" not in js and "https://" not in js


def _headers(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return {k.lower(): v for k, v in r.headers.items()}


def test_the_pages_carry_security_headers(server) -> None:
    """No sniffing, no framing, no Referer, and a CSP that allows only the service's own files
    and the API page's inline script and style by hash (tests/service/test_playground.py shows
    both pages still work under it, in Chromium)."""
    for path in ("/", "/docs.json", "/playground/", "/playground/playground.js", "/static_content/swagger-ui.css"):
        h = _headers(server.url + path)
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY", path
        assert h["referrer-policy"] == "no-referrer", path
        csp = dict(d.strip().split(" ", 1) for d in h["content-security-policy"].split(";"))
        assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'", path
        assert ("'unsafe-inline'" not in h["content-security-policy"]
                and "'unsafe-eval'" not in h["content-security-policy"])
        assert csp["script-src"].startswith("'self' 'sha256-") and csp["connect-src"] == "'self'", path
