"""Admission control: what one worker holds is bounded, and overload costs almost nothing.

A request is admitted before its body is read. Three bounds, per worker:

- requests held (being read, decoded, queued or run): CONVSERVE_MAX_QUEUE. A request that
  finds them all taken waits, unread, in a first-come-first-served line for at most
  CONVSERVE_ADMISSION_WAIT_MS; a slot that frees passes straight to the head of the line.
  A waiting request costs one future: its body is not parsed and nothing is decoded, and
  the server stops reading its socket once ~64 KiB of it are buffered.
- requests waiting: CONVSERVE_MAX_WAITING. Beyond it, and when the wait runs out, the answer
  is 503 + Retry-After at once, with ``Connection: close`` (the body is never read).
- body bytes held: CONVSERVE_MAX_INFLIGHT_BYTES, counted as the bytes arrive (a
  Content-Length is reserved on admission; chunked bodies are counted chunk by chunk).

Why a short line rather than refusing the moment the slots are full: clients that retry at
once (load generators, impatient proxies) turn instant refusals into a storm that keeps the
event loop, and the GIL it holds, busy with refusing while admitted requests starve. Waiting
requests cost nothing until they are served, so goodput stays at the sustainable rate while
an admitted request's latency stays bounded by max_requests (CONVSERVE_MAX_QUEUE) / throughput + the wait.
"""

from __future__ import annotations

import asyncio
from collections import deque

from service.errors import Overloaded

RETRY = {"Retry-After": "1"}
SHUTTING_DOWN = "this worker is shutting down; retry (another replica or worker will answer)"


class Admission:
    """Counts the requests and body bytes a worker holds (one event loop, no locks)."""

    def __init__(self, max_requests: int, max_bytes: int, wait_s: float = 0.0, max_waiting: int = 0) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.wait_s, self.max_waiting = wait_s, max_waiting
        self.requests = 0   # slots held
        self.bytes = 0      # body bytes reserved by held requests
        self.waiters: deque[asyncio.Future[bool]] = deque()
        self.closed = False  # shutting down (service.lifecycle.Drain): nothing more is admitted

    def close(self) -> None:
        """Admit nothing more: waiting requests and new ones get 503 (held ones finish)."""
        self.closed = True
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(False)

    async def admit(self, content_length: int | None) -> Ticket:
        """A ticket for one request once a slot is free, or Overloaded (503) without touching its body."""
        if self.closed:
            raise Overloaded(SHUTTING_DOWN, headers=RETRY)
        if self.requests < self.max_requests and not self.waiters:
            self.requests += 1
        else:
            await self._wait_for_slot()
        ticket = Ticket(self)
        if content_length:
            try:
                ticket.reserve(content_length)
            except Overloaded:
                ticket.release()
                raise
        return ticket

    async def _wait_for_slot(self) -> None:
        if len(self.waiters) >= self.max_waiting or self.wait_s <= 0:
            raise Overloaded(f"this worker holds {self.requests} requests and {len(self.waiters)} wait; "
                             "retry shortly", headers=RETRY)
        loop = asyncio.get_running_loop()
        slot: asyncio.Future[bool] = loop.create_future()
        self.waiters.append(slot)
        timer = loop.call_later(self.wait_s, self._expire, slot)
        try:
            handed = await slot
        except BaseException:  # cancelled (the request timed out elsewhere): give back what we hold
            if slot.done() and not slot.cancelled() and slot.result():
                self._free_slot()
            elif slot in self.waiters:
                self.waiters.remove(slot)
            raise
        finally:
            timer.cancel()
        if not handed and self.closed:
            raise Overloaded(SHUTTING_DOWN, headers=RETRY)
        if not handed:
            raise Overloaded(f"no room in this worker for {self.wait_s:g} s ({self.requests} requests held); "
                             "retry shortly", headers=RETRY)

    def _expire(self, slot: asyncio.Future[bool]) -> None:
        if not slot.done():
            self.waiters.remove(slot)
            slot.set_result(False)

    def _free_slot(self) -> None:
        """A held request is done: its slot goes to the first waiter, or back to the pool."""
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(True)  # the slot passes on; ``requests`` is unchanged
                return
        self.requests -= 1


class Ticket:
    """One admitted request; :meth:`release` when it is answered (idempotent)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.reserved = 0   # bytes counted against the worker's budget
        self.received = 0   # bytes of the body seen so far
        self.released = False

    def reserve(self, n: int) -> None:
        """Count ``n`` more body bytes; Overloaded if the worker's byte budget is spent."""
        a = self.admission
        if a.bytes + n > a.max_bytes:
            raise Overloaded(f"this worker holds {a.bytes} bytes of request bodies (limit {a.max_bytes}); "
                             "retry shortly", headers=RETRY)
        a.bytes += n
        self.reserved += n

    def grow(self, n: int) -> None:
        """``n`` body bytes arrived: count what the Content-Length reservation does not cover."""
        self.received += n
        if self.received > self.reserved:
            self.reserve(self.received - self.reserved)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.bytes -= self.reserved
            self.admission._free_slot()
