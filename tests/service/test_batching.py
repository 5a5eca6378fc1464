import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batching import BatchResult, DynamicBatcher, WorkerRuns
from service.errors import Overloaded


def _slow_double(batch: np.ndarray) -> list[dict[str, np.ndarray]]:
    time.sleep(0.05)
    return [{"y": np.array(x.sum() * 2)} for x in batch]


def _run(coro, timeout: float = 10):
    """Run ``coro``; a hang fails the test instead of stalling the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    sizes = []
    b = DynamicBatcher(_slow_double, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=0, max_pending_images=100,
                       on_batch=lambda n, s: sizes.append(n))

    async def main():
        return await asyncio.gather(*(b.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(20)))

    results = _run(main())
    assert [int(r.outputs["y"]) for r in results] == [i * 12 * 2 for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) > 1 and max(sizes) <= 8
    assert all(isinstance(r, BatchResult) and 1 <= r.batch_size <= 8 for r in results)


def test_queued_images_are_shared_among_free_runs() -> None:
    """Two runs free and two images queued: two batches of one at once, not one of two."""
    sizes = []
    b = DynamicBatcher(_slow_double, ThreadPoolExecutor(2), max_batch=8, max_wait_ms=0, max_pending_images=100,
                       on_batch=lambda n, s: sizes.append(n), concurrency=2)

    async def main():
        return await asyncio.gather(*(b.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(2)))

    results = _run(main())
    assert sorted(sizes) == [1, 1] and [r.batch_size for r in results] == [1, 1]

    sizes.clear()

    async def many():
        return await asyncio.gather(*(b.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(16)))

    results = _run(many())
    assert [int(r.outputs["y"]) for r in results] == [i * 12 * 2 for i in range(16)]
    assert sum(sizes) == 16 and max(sizes) <= 8


def test_an_idle_request_does_not_wait_for_company() -> None:
    b = DynamicBatcher(lambda x: [{"y": v} for v in x], ThreadPoolExecutor(1), max_batch=8, max_wait_ms=0,
                       max_pending_images=10)

    async def main():
        t0 = time.perf_counter()
        r = await b.submit(np.zeros((1, 1, 3), np.uint8))
        return r, time.perf_counter() - t0

    r, waited = _run(main())
    assert r.batch_size == 1 and waited < 1.0


def test_full_queue_answers_503_at_once() -> None:
    b = DynamicBatcher(_slow_double, ThreadPoolExecutor(1), max_batch=2, max_wait_ms=0, max_pending_images=3)

    async def main():
        tasks = [asyncio.ensure_future(b.submit(np.zeros((1, 1, 3), np.uint8))) for _ in range(12)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = _run(main())
    rejected = [r for r in results if isinstance(r, Overloaded)]
    assert rejected and all(r.headers["Retry-After"] == "1" and r.status == 503 for r in rejected)
    assert len(rejected) < 12 and all(isinstance(r, BatchResult) for r in results if r not in rejected)


def test_model_failure_reaches_every_caller_and_batcher_survives() -> None:
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return [{"y": x[0, 0, 0]} for x in batch]

    b = DynamicBatcher(flaky, ThreadPoolExecutor(1), max_batch=4, max_wait_ms=5, max_pending_images=10)

    async def main():
        first = await asyncio.gather(*(b.submit(np.zeros((1, 1, 3), np.uint8)) for _ in range(2)),
                                     return_exceptions=True)
        second = await b.submit(np.full((1, 1, 3), 7, np.uint8))
        return first, second

    first, second = _run(main())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert int(second.outputs["y"]) == 7


@pytest.mark.parametrize("broken", ["too_few_results", "not_a_list"])
def test_a_broken_output_split_is_an_error_for_every_caller_not_a_hang(broken) -> None:
    def run(batch):
        return [{"y": batch[0]}] if broken == "too_few_results" else {"y": batch}

    b = DynamicBatcher(run, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=5, max_pending_images=10)

    async def main():
        return await asyncio.gather(*(b.submit(np.zeros((1, 1, 3), np.uint8)) for _ in range(3)),
                                    return_exceptions=True)

    results = _run(main())
    assert len(results) == 3 and all(isinstance(r, Exception) for r in results)


def test_a_failing_callback_does_not_fail_or_hang_the_requests() -> None:
    def on_batch(n, s):
        raise ValueError("metrics backend down")

    b = DynamicBatcher(lambda x: [{"y": v} for v in x], ThreadPoolExecutor(1), max_batch=4, max_wait_ms=0,
                       max_pending_images=10, on_batch=on_batch)

    async def main():
        first = await asyncio.gather(*(b.submit(np.zeros((1, 1, 3), np.uint8)) for _ in range(3)))
        second = await b.submit(np.ones((1, 1, 3), np.uint8))
        return first, second

    first, second = _run(main())
    assert len(first) == 3 and int(second.outputs["y"][0, 0, 0]) == 1


def test_an_idle_run_can_be_claimed_outside_the_queue_and_is_given_back() -> None:
    batches = []
    b = DynamicBatcher(_slow_double, ThreadPoolExecutor(2), max_batch=8, max_wait_ms=0, max_pending_images=100,
                       on_batch=lambda n, s: batches.append(n), concurrency=2)

    async def main() -> list[BatchResult]:
        assert b.claim_idle_run() and b.claim_idle_run()   # both runs taken by callers ...
        assert not b.claim_idle_run()                      # ... so a third goes through the queue
        queued = asyncio.ensure_future(b.submit(np.full((2, 2, 3), 1, np.uint8)))
        await asyncio.sleep(0.1)
        assert not queued.done() and b.queued == 1         # it waits for a run
        b.release_run(1, 0.01)                             # a claimed run ends: the queue moves
        result = await queued
        b.release_run(1, None)                             # the other claimed run failed: not counted
        assert b.claim_idle_run()                          # idle again
        b.release_run(1, 0.02)
        return [result]

    (result,) = _run(main())
    assert int(result.outputs["y"]) == 24 and sorted(batches) == [1, 1, 1]


def _costly(batch: np.ndarray) -> list[dict[str, np.ndarray]]:
    """A fake model whose run costs 20 ms an image."""
    time.sleep(0.020 * len(batch))
    return [{"y": np.array(x.sum())} for x in batch]


def test_batches_are_bounded_by_time_as_well_as_count() -> None:
    """A model that costs 20 ms an image, a 90 ms target: with 40 images queued, batches hold
    at most four (80 ms), not the count cap's eight, and the queue is still batched."""
    sizes, seconds = [], []
    b = DynamicBatcher(_costly, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=0, max_pending_images=100,
                       on_batch=lambda n, s: (sizes.append(n), seconds.append(s)), target_s=0.090)

    async def main():
        # What warm-up measures (service.repository.batch_costs): one image and the largest batch.
        for n in (1, 8):
            b.cost.observe(n, _timed(_costly, n))
        return await asyncio.gather(*(b.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(40)))

    results = _run(main())
    assert [int(r.outputs["y"]) for r in results] == [i * 12 for i in range(40)]
    # Each batch's own cost (20 ms an image, known to the fake model) is within the target, and
    # the queue is still batched (batches of three when this machine's sleeps overshoot).
    assert sum(sizes) == 40 and max(sizes) <= 4 and len(sizes) <= 14, sizes
    assert all(0.020 * n <= 0.090 for n in sizes)
    assert b.batch_limit() in (3, 4)


def test_without_a_target_batches_are_bounded_by_count_only() -> None:
    sizes = []
    b = DynamicBatcher(_costly, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=0, max_pending_images=100,
                       on_batch=lambda n, s: sizes.append(n))

    async def main():
        return await asyncio.gather(*(b.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(24)))

    _run(main())
    assert max(sizes) == 8


def test_a_claimed_run_says_whether_the_whole_worker_was_idle() -> None:
    """Two models' batchers share one WorkerRuns: a lone image may take every core only when
    no run of any model is in flight."""
    worker = WorkerRuns()
    a = DynamicBatcher(_costly, ThreadPoolExecutor(1), 8, 0, 10, concurrency=2, worker=worker)
    c = DynamicBatcher(_costly, ThreadPoolExecutor(1), 8, 0, 10, concurrency=2, worker=worker)
    first = a.claim_idle_run()
    assert first is not None and first.alone
    second = c.claim_idle_run()
    assert second is not None and not second.alone  # the other model is running
    a.release_run(1, 0.01)
    c.release_run(1, 0.01)
    assert worker.running == 0 and a.claim_idle_run().alone
    a.release_run(1, 0.01)
    worker.requests = lambda: 2  # another request is being read or decoded: not alone
    assert not a.claim_idle_run().alone


def test_only_runs_that_had_the_cores_to_themselves_teach_the_cost() -> None:
    """Runs that share the cores take longer by the sharing; were their times kept, the time
    bound would tighten as load grows, down to batches of one."""
    b = DynamicBatcher(_costly, ThreadPoolExecutor(2), 8, 0, 100, concurrency=2, target_s=0.090)
    first, second = b.claim_idle_run(), b.claim_idle_run()
    assert first.alone and not second.alone
    b.release_run(1, 0.010, alone=first.alone)
    b.release_run(1, 0.500, alone=second.alone)  # slowed by the other run: not kept
    assert b.cost.seen == {1: 0.010}


def _timed(fn, n: int) -> float:
    t = time.perf_counter()
    fn(np.zeros((n, 2, 2, 3), np.uint8))
    return time.perf_counter() - t
