"""A per-model dynamic batcher in the style of Triton's: batch what is queued, never stall.

Requests put one preprocessed image each into the model's queue and await a future. A
single loop per model takes everything queued (up to ``max_batch``), runs it in the
inference thread, and resolves the futures. While a batch runs, new requests accumulate,
so batch size grows with load by itself; when idle, a request waits at most ``max_wait_ms``
for company. There is no latency prediction that cancels requests: the only refusal is a
full queue, answered at once with 503 + Retry-After (explicit overload, never a hang).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any, Callable

import numpy as np

from service.errors import Overloaded

RunBatch = Callable[[np.ndarray], dict[str, np.ndarray]]
OnBatch = Callable[[int, float], None]


class DynamicBatcher:
    """Collects single images into batches for ``run_batch`` (uint8 [N,H,W,3] -> outputs)."""

    def __init__(self, run_batch: RunBatch, executor: Executor, max_batch: int, max_wait_ms: float,
                 max_queue: int, batch_axis_outputs: bool = True, on_batch: OnBatch | None = None) -> None:
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.max_wait = max(1, max_batch), max_wait_ms / 1000.0
        self.max_queue, self.batch_axis_outputs = max_queue, batch_axis_outputs
        self.on_batch = on_batch
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Queue one [H,W,3] image; returns that image's outputs (batch axis removed)."""
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"the model's queue is full ({self.max_queue} images waiting); retry shortly",
                             headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._loop())
        fut: asyncio.Future = loop.create_future()
        self._pending.append((image, fut))
        assert self._wakeup is not None
        self._wakeup.set()
        return await fut

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            if len(self._pending) < self.max_batch and self.max_wait > 0:
                deadline = loop.time() + self.max_wait
                while len(self._pending) < self.max_batch and loop.time() < deadline:
                    await asyncio.sleep(min(0.0005, max(deadline - loop.time(), 0)))
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                batch = [(x, f) for x, f in batch if not f.cancelled()]
                if batch:
                    await self._run(batch)

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            stacked = np.stack([x for x, _ in batch])
            outputs = await loop.run_in_executor(self.executor, self.run_batch, stacked)
        except Exception as exc:  # the model failed: every caller in the batch hears it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        if self.on_batch:
            self.on_batch(len(batch), elapsed)
        for i, (_, fut) in enumerate(batch):
            if not fut.done():
                result: dict[str, Any] = {k: (v[i] if self.batch_axis_outputs else v) for k, v in outputs.items()}
                result["__batch_size__"] = len(batch)
                fut.set_result(result)
