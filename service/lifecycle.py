"""A worker's life: graceful shutdown on SIGTERM, and workers that come back when they die.

**Drain.** ``docker stop``, Kubernetes and ``bentoml serve``'s supervisor stop a worker with
SIGTERM. uvicorn's own handler would close the listening socket and wait for open
connections; :class:`Drain` runs first instead: it marks the worker as draining at once
(/readyz and /v2/health/ready answer 503, so load balancers stop sending), answers requests
that arrive from then on with 503 + ``Connection: close`` (admission is closed), lets every
request already admitted finish, and then hands the signal to uvicorn, which exits. If the
admitted requests take longer than CONVSERVE_GRACE_S, it hands over anyway. The container's
stop timeout (docker-compose ``stop_grace_period``) must be longer than the grace period.

**Respawn.** A worker that dies is restarted by BentoML's supervisor, inside containers too:
see ``respawn-in-containers`` in service.bentoml_patches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("convserve.lifecycle")
EXIT_WATCHDOG_S = 5.0  # after the drain, how long uvicorn's own shutdown may take before the worker exits anyway


class Drain:
    """SIGTERM handling for one worker; see the module docstring."""

    def __init__(self, held: Callable[[], int], close_admission: Callable[[], None], grace_s: float) -> None:
        self.held, self.close_admission, self.grace_s = held, close_admission, grace_s
        self.draining = False
        self.started: float | None = None
        self._previous: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Put :meth:`_on_sigterm` in front of whatever handles SIGTERM now (uvicorn's handler)."""
        self._loop = loop
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.draining:  # e.g. kill sent to the process group and the supervisor's own: one drain
            return
        self.draining = True
        self.started = time.monotonic()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._begin, signum, frame)

    def _begin(self, signum: int, frame: Any) -> None:
        self.close_admission()
        log.info("SIGTERM: draining (not ready; %d request(s) in progress; grace %.0f s)", self.held(), self.grace_s)
        asyncio.ensure_future(self._wait_then_exit(signum, frame))

    async def _wait_then_exit(self, signum: int, frame: Any) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.held() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = self.held()
        if left:
            log.warning("grace period of %.0f s over with %d request(s) unanswered; exiting", self.grace_s, left)
        else:
            log.info("drained in %.2f s; exiting", time.monotonic() - (self.started or time.monotonic()))
        self._hand_over(signum, frame)

    def _hand_over(self, signum: int, frame: Any) -> None:
        # A watchdog: uvicorn's own shutdown should now take milliseconds (nothing is held), but
        # in 3 of about 30 restarts of a fleet replica under load the worker logged "drained"
        # and never exited, and docker killed it 30 s later while its listening socket still
        # queued connections. Whatever keeps it alive then, it has nothing left to answer.
        watchdog = threading.Timer(EXIT_WATCHDOG_S, _exit_now, args=(signum,))
        watchdog.daemon = True  # a worker that exits normally does not wait for it
        watchdog.start()
        previous = self._previous
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:
            signal.raise_signal(signum)


def _exit_now(signum: int) -> None:
    """The watchdog's end: the worker is still alive EXIT_WATCHDOG_S after the drain."""
    log.warning("still running %.0f s after the drain; exiting now", EXIT_WATCHDOG_S)
    logging.shutdown()
    os._exit(128 + signum)
