"""Spreading keep-alive connections over BentoML's workers.

All workers accept from one shared listening socket, and a worker that wakes up first takes
every pending connection: clients that keep their connections open (wrk, load balancers,
connection pools) can all end up on one worker while the others idle.

Each worker publishes how many requests it holds in a small shared file (one 8-byte slot per
worker, created by the main process before the workers start). A worker that answers while
it holds more than its share, ceil(all held / workers), and at least two, answers with
``Connection: close``: the client reconnects, and the accept goes to whichever worker's
event loop is free first, usually a less busy one. Once the shares are even nothing is closed.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
from pathlib import Path

ENV = "CONVSERVE_BALANCE_FILE"
SLOT = 8


def create_file(workers: int) -> Path:
    """The shared file for ``workers`` workers (the main process calls this; workers inherit its path)."""
    fd, name = tempfile.mkstemp(prefix="convserve-balance-")
    os.ftruncate(fd, max(workers, 1) * SLOT)
    os.close(fd)
    return Path(name)


class Balancer:
    """One worker's view of the shared counts."""

    def __init__(self, path: Path, index: int, workers: int) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} is not below {workers}")
        self.index, self.workers = index, workers
        with open(path, "r+b") as fh:
            self._map = mmap.mmap(fh.fileno(), workers * SLOT)
        self.counts = memoryview(self._map).cast("q")
        self.counts[index] = 0  # a restarted worker starts empty
        self.closed = 0  # connections this worker asked clients to reopen

    def publish(self, held: int) -> None:
        """This worker now holds ``held`` requests."""
        self.counts[self.index] = held

    def should_close(self, held: int) -> bool:
        """Whether to close the connection of the request being answered now."""
        if held < 2:
            return False
        share = math.ceil(sum(self.counts) / self.workers)
        if held > share:
            self.closed += 1
            return True
        return False

    @classmethod
    def from_env(cls, index: int, workers: int) -> Balancer | None:
        """The balancer of worker ``index`` (0-based), or None with one worker or no shared file."""
        path = os.environ.get(ENV)
        if workers < 2 or not path or not Path(path).is_file():
            return None
        return cls(Path(path), index, workers)
