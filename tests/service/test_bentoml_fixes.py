"""BentoML's request-timeout middleware, as patched by service.bentoml_fixes: no timer outlives its request."""

from __future__ import annotations

import asyncio

from bentoml._internal.server.http.traffic import TimeoutMiddleware

from service import bentoml_fixes


async def _app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(middleware: TimeoutMiddleware, n: int) -> tuple[int, int]:
    """Answer ``n`` requests; the timers the loop still holds afterwards, and the 200s sent."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    for _ in range(n):
        await middleware({"type": "http", "method": "GET", "path": "/"}, receive, send)
    loop = asyncio.get_running_loop()
    pending = sum(1 for h in loop._scheduled if not h.cancelled())  # type: ignore[attr-defined]
    return pending, sum(1 for m in sent if m.get("status") == 200)


def test_no_timer_outlives_its_request() -> None:
    bentoml_fixes.apply()
    pending, ok = asyncio.run(_serve(TimeoutMiddleware(_app, timeout=120), 50))
    assert ok == 50 and pending == 0


def test_a_request_over_the_timeout_still_gets_504() -> None:
    bentoml_fixes.apply()

    async def slow(scope, receive, send) -> None:
        await asyncio.sleep(5)

    async def main() -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        await TimeoutMiddleware(slow, timeout=0.05)({"type": "http", "method": "GET", "path": "/"}, receive, send)
        return sent

    sent = asyncio.run(main())
    assert sent[0]["status"] == 504
