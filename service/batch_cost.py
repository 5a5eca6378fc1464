"""What a batch of each size costs one model, measured, so that batches can be bounded by time.

The batcher (service.batching) asks :meth:`BatchCost.largest_within` for the largest batch
expected to finish within the model's target, and reports every run it makes to
:meth:`BatchCost.observe`. Sizes seen are averaged (an exponentially weighted mean: the
cost under today's load, not yesterday's); sizes not seen yet are interpolated between the
nearest seen ones (a batch's cost is close to linear in its size on a CPU: measured for the
benchmark's ResNet-18, 36 / 71 / 144 / 293 ms at 1 / 2 / 4 / 8 images), or extrapolated in
proportion beyond them. Warm-up seeds it with one image and the largest batch.

The default target (:func:`default_target`) is four single-image runs, and never under
TARGET_FLOOR_S: light models (a few milliseconds an image) still batch as deep as
CONVSERVE_MAX_BATCH allows (MobileNetV3-Large: 45 ms for eight), while a heavy one
(ResNet-18, 34 ms an image on one thread) forms batches of about four, so a request
arriving just after a batch started waits for ~140 ms of work, not for a batch of eight
(~280 ms). The costs kept are those of runs that had the cores to themselves
(service.batching), so the bound does not tighten as load slows every run down. Triton's and TorchServe's
max-queue-delay are the anchors; this needs no tuning: CONVSERVE_BATCH_TARGET_MS overrides it.
"""

from __future__ import annotations

import threading

TARGET_FLOOR_S = 0.050  # below this, time bounds cost more throughput than they save latency
TARGET_SINGLE_IMAGES = 4  # the default target in single-image runs
SMOOTHING = 0.2  # weight of a new observation in a size's average


def default_target(single_image_s: float) -> float:
    """The time a batch may take when nobody set one: see the module docstring."""
    return max(TARGET_FLOOR_S, TARGET_SINGLE_IMAGES * single_image_s)


class BatchCost:
    """Seconds per batch size for one model (thread-safe: runs report from their threads)."""

    def __init__(self, seen: dict[int, float] | None = None) -> None:
        self._seen: dict[int, float] = {}
        self._lock = threading.Lock()
        for size, seconds in (seen or {}).items():
            self.observe(size, seconds)

    @property
    def seen(self) -> dict[int, float]:
        """The averaged seconds of every batch size run so far."""
        return dict(self._seen)

    def observe(self, size: int, seconds: float) -> None:
        """A run of ``size`` images took ``seconds``."""
        if size < 1 or not seconds >= 0:
            return
        with self._lock:
            old = self._seen.get(size)
            self._seen[size] = seconds if old is None else old + SMOOTHING * (seconds - old)

    def estimate(self, size: int) -> float | None:
        """Expected seconds for a batch of ``size``; None before anything was seen."""
        seen = self._seen
        if size in seen:
            return seen[size]
        if not seen:
            return None
        below = max((s for s in seen if s < size), default=None)
        above = min((s for s in seen if s > size), default=None)
        if below is not None and above is not None:
            w = (size - below) / (above - below)
            return seen[below] + w * (seen[above] - seen[below])
        nearest = below if below is not None else above
        assert nearest is not None
        return seen[nearest] * size / nearest

    def largest_within(self, seconds: float, cap: int) -> int:
        """The largest batch (1..``cap``) expected to take at most ``seconds``; ``cap`` before
        anything was seen, 1 when even one image takes longer."""
        best = 1
        for size in range(2, cap + 1):
            cost = self.estimate(size)
            if cost is None:
                return cap
            if cost > seconds:
                break
            best = size
        return best
