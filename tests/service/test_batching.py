import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batching import DynamicBatcher
from service.errors import Overloaded


def _slow_double(batch: np.ndarray) -> dict[str, np.ndarray]:
    time.sleep(0.05)
    return {"y": batch.reshape(len(batch), -1).sum(1) * 2}


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    sizes = []
    b = DynamicBatcher(_slow_double, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=2, max_queue=100,
                       on_batch=lambda n, s: sizes.append(n))

    async def main():
        return await asyncio.gather(*(b.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(20)))

    results = asyncio.run(main())
    assert [int(r["y"]) for r in results] == [i * 12 * 2 for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) > 1 and max(sizes) <= 8
    assert all(r["__batch_size__"] >= 1 for r in results)


def test_full_queue_answers_503_at_once() -> None:
    b = DynamicBatcher(_slow_double, ThreadPoolExecutor(1), max_batch=2, max_wait_ms=0, max_queue=3)

    async def main():
        tasks = [asyncio.ensure_future(b.submit(np.zeros((1, 1, 3), np.uint8))) for _ in range(12)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    rejected = [r for r in results if isinstance(r, Overloaded)]
    assert rejected and all(r.headers["Retry-After"] == "1" and r.status == 503 for r in rejected)
    assert len(rejected) < 12


def test_model_failure_reaches_every_caller_and_batcher_survives() -> None:
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return {"y": batch[:, 0, 0, 0]}

    b = DynamicBatcher(flaky, ThreadPoolExecutor(1), max_batch=4, max_wait_ms=5, max_queue=10)

    async def main():
        first = await asyncio.gather(*(b.submit(np.zeros((1, 1, 3), np.uint8)) for _ in range(2)), return_exceptions=True)
        second = await b.submit(np.full((1, 1, 3), 7, np.uint8))
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert int(second["y"]) == 7
