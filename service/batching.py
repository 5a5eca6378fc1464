"""A per-model dynamic batcher in the style of Triton's: batch what is queued, never stall.

Requests put one preprocessed image each into the model's queue and await a future. A
loop per model takes what is queued (up to ``max_batch``, shared evenly among the runs that
are free), runs it on the inference executor, and resolves the futures; up to
``concurrency`` batches run at once (Triton's instance count: on a CPU, two single-threaded
runs use two cores with less overhead than one run on two threads).
While the runs are busy, new requests accumulate, so batches grow
with load by themselves; an idle request waits ``max_wait_ms`` for company (default 0: like
Triton, only what is already queued is batched). Nothing predicts latency and cancels: the
only refusal is a full queue, answered at once with 503 + Retry-After.

At low load a caller may skip the queue: :meth:`DynamicBatcher.claim_idle_run` hands it a
free run when nothing is queued, and it runs the model in its own thread (the service
decodes and infers a lone image in one thread, saving a hand-over per request). The claim
says whether the whole worker was idle (:class:`WorkerRuns`, shared by a worker's batchers):
then the image may take every core (service.placement).

Batches are bounded by time as well as count: with a :class:`service.batch_cost.BatchCost`
and a target, a batch holds no more images than are expected to finish within the target
(runs that had the cores to themselves report their cost), so a heavy model does not make
a request that arrives just after a batch started wait for a long one.

Every accepted request is answered: if the model, the output split or anything else in a
batch raises, each of its requests gets that exception (the service answers 500), and a
failing ``on_batch`` callback (metrics) is logged, never passed on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.batch_cost import BatchCost
from service.errors import Overloaded

log = logging.getLogger("convserve.batching")

Outputs = dict[str, np.ndarray]
RunBatch = Callable[[np.ndarray], list[Outputs]]  # uint8 [N, H, W, 3] -> one output dict per image
OnBatch = Callable[[int, float], None]
OnDropped = Callable[[int], None]  # images dropped because their callers went away
_Item = tuple[np.ndarray, "asyncio.Future[BatchResult]", float]  # image, its future, when it was queued


@dataclass(frozen=True)
class BatchResult:
    """One image's outputs, the size of the batch they were computed in, and when (perf_counter
    seconds) the image was queued and its batch started: the difference is its queue wait."""

    outputs: Outputs
    batch_size: int
    queued: float
    started: float
    threads: int = 1  # ONNX Runtime intra-op threads of the run that computed it

    @property
    def queue_wait(self) -> float:
        return self.started - self.queued


class WorkerRuns:
    """Model runs in flight in one worker, across its batchers (claimed and queued alike), and
    how many requests the worker holds (``requests``: the service sets it to admission's count)."""

    def __init__(self, requests: Callable[[], int] | None = None) -> None:
        self.running = 0
        self.requests = requests or (lambda: 0)

    def idle(self) -> bool:
        """No run in flight and no request but the caller's: a lone image may take every core."""
        return self.running == 0 and self.requests() <= 1


@dataclass(frozen=True)
class IdleRun:
    """A run claimed by :meth:`DynamicBatcher.claim_idle_run`; ``alone``: nothing else ran in
    the worker when it was claimed, so the image may use every core."""

    alone: bool


class DynamicBatcher:
    """Collects single images into batches for ``run_batch``."""

    def __init__(self, run_batch: RunBatch, executor: Executor, max_batch: int, max_wait_ms: float,
                 max_pending_images: int, on_batch: OnBatch | None = None, concurrency: int = 1,
                 cost: BatchCost | None = None, target_s: float | None = None, worker: WorkerRuns | None = None,
                 threads: int = 1, on_dropped: OnDropped | None = None) -> None:
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.max_wait = max(1, max_batch), max_wait_ms / 1000.0
        self.max_pending_images, self.concurrency = max_pending_images, max(1, concurrency)
        self.on_batch = on_batch
        self.cost, self.target_s = cost or BatchCost(), target_s  # target None: batches bounded by count only
        self.worker = worker or WorkerRuns()
        self.threads = threads
        self.on_dropped = on_dropped
        self.dropped = 0  # images never run: their callers were cancelled while they waited
        self._pending: list[_Item] = []
        self._running = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Images waiting for a batch (not counting the batch running now)."""
        return len(self._pending)

    async def submit(self, image: np.ndarray) -> BatchResult:
        """Queue one [H, W, 3] image; returns that image's outputs."""
        if len(self._pending) >= self.max_pending_images:
            raise Overloaded(f"the model's queue is full ({self.max_pending_images} images waiting); retry shortly",
                             headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._loop())
        fut: asyncio.Future[BatchResult] = loop.create_future()
        self._pending.append((image, fut, time.perf_counter()))
        assert self._wakeup is not None
        self._wakeup.set()
        return await fut

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.max_wait > 0 and 0 < len(self._pending) < self.max_batch:
                deadline = loop.time() + self.max_wait
                while len(self._pending) < self.max_batch and loop.time() < deadline:
                    await asyncio.sleep(min(0.0005, max(deadline - loop.time(), 0)))
            while self._pending and self._running < self.concurrency:
                # Share what is queued among the idle runs: two images and two free cores make
                # two batches of one, not one batch of two with a core left idle.
                size = min(self.batch_limit(), -(-len(self._pending) // (self.concurrency - self._running)))
                batch, self._pending = self._pending[:size], self._pending[size:]
                live = [item for item in batch if not item[1].cancelled()]
                if len(live) < len(batch):
                    self._drop(len(batch) - len(live))
                batch = live
                if batch:
                    alone = self.worker.running == 0
                    self._running += 1
                    self.worker.running += 1
                    loop.create_task(self._run(batch, alone))

    def _drop(self, n: int) -> None:
        """``n`` queued images whose callers went away (a gRPC cancel or deadline, a closed
        stream, an HTTP client that disconnected): never run, counted."""
        self.dropped += n
        if self.on_dropped:
            try:
                self.on_dropped(n)
            except Exception:
                log.exception("on_dropped callback failed")

    def batch_limit(self) -> int:
        """The largest batch to form now: CONVSERVE_MAX_BATCH, and no more images than are
        expected to finish within the target (at least one)."""
        if self.target_s is None:
            return self.max_batch
        return self.cost.largest_within(self.target_s, self.max_batch)

    def claim_idle_run(self) -> IdleRun | None:
        """Take a free run for one image outside the queue, when nothing is queued and a run
        is free: the caller runs the model itself (no hand-over to the inference thread at
        low load) and must call :meth:`release_run`. None when the queue is the way."""
        if self._pending or self._running >= self.concurrency:
            return None
        alone = self.worker.idle()
        self._running += 1
        self.worker.running += 1
        return IdleRun(alone)

    def release_run(self, size: int, seconds: float | None, threads: int | None = None, alone: bool = False) -> None:
        """A claimed run is over (``seconds`` None if it failed). Its cost is kept only when it
        ran ``alone`` on the batches' ``threads`` (see :meth:`_run`)."""
        self._done()
        if seconds is not None and alone and (threads is None or threads == self.threads):
            self.cost.observe(size, seconds)
        if self.on_batch and seconds is not None:
            try:
                self.on_batch(size, seconds)
            except Exception:
                log.exception("on_batch callback failed (the run itself was answered)")

    def _done(self) -> None:
        """A run finished: free its slot and look at the queue again."""
        self._running -= 1
        self.worker.running -= 1
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run(self, batch: list[_Item], alone: bool) -> None:
        """Run one batch and resolve every future in it, whatever happens. Its cost is kept
        only when no other run was in flight as it started: the time bound is about what
        the model needs, and runs that share the cores take longer by the sharing, which
        would shrink batches under load, each smaller batch costing more per image (measured:
        batches of one under 16 clients, 20% fewer images per second, before this rule)."""
        loop = asyncio.get_running_loop()
        try:
            await self._run_batch(loop, batch, alone)
        finally:
            self._done()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item], alone: bool) -> None:
        try:
            start = time.perf_counter()
            stacked = np.stack([x for x, _, _ in batch])
            outputs = await loop.run_in_executor(self.executor, self.run_batch, stacked)
            if len(outputs) != len(batch):
                raise RuntimeError(f"the model returned {len(outputs)} results for a batch of {len(batch)}")
            elapsed = time.perf_counter() - start
            if alone:
                self.cost.observe(len(batch), elapsed)
            for (_, fut, queued), out in zip(batch, outputs):
                if not fut.done():
                    fut.set_result(BatchResult(out, len(batch), queued, start, self.threads))
        except BaseException as exc:  # the model or the split failed: every caller in the batch hears it
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("inference cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        if self.on_batch:
            try:
                self.on_batch(len(batch), elapsed)
            except Exception:
                log.exception("on_batch callback failed (the batch itself was answered)")
