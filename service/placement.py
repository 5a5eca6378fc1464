"""How one model runs on a worker's cores, chosen from what it was measured to cost.

A worker has ``cores`` cores for inference (service.settings). A model can use them three
ways (:data:`MODES`):

- ``narrow``: every run on one intra-op thread, ``cores`` runs at once. The most images per
  second when there is load, but a lone image uses one core while the others idle.
- ``wide``: one run at a time on all ``cores`` threads. A lone image is as fast as the
  machine allows and the tail is tight (p99/p50 1.08 at 4 clients for ResNet-18), but under
  load a run's threads wait for each other whenever decoding takes one of their cores:
  measured in the service, 8-10% fewer images per second than ``narrow`` (ResNet-18 and the
  shipped detector), although ONNX Runtime alone splits their batches at 0.9-1.0.
- ``both``: batches as in ``narrow``, and a second session of the same file on ``cores``
  threads for a lone image on an idle worker: the lone latency of ``wide`` and the
  throughput of ``narrow``, for a second copy of the weights (ResNet-18: +86 MB).

:func:`choose` picks from a :class:`Profile`: the model's seconds for one image and for its
largest batch, on one thread and on ``cores`` threads, and what the second session costs in
memory. A model whose lone image gains under LONE_GAIN from more threads stays ``narrow``
(MobileNetV3-Large: 6.6 ms on one thread or two); one that gains gets ``both`` when the
second session fits the budget (CONVSERVE_LONE_SESSION_MB; ResNet-18: 36 ms on one thread,
20 ms on two, +86 MB), else ``wide`` if its batches split well (a VGG, whose copy would cost
half a gigabyte), else ``narrow``. ONNX Runtime cannot change a session's thread count per
run, and two sessions cannot share prepacked weights from Python (shared initializers turn
prepacking off: measured 12% slower), hence the budget.

The profile is measured in a short-lived process (``python -m service.placement``: the
start-up check does it for every model before workers start, and a worker does it for a
version that appears while it serves), so that a worker never holds a session it does not
serve: ONNX Runtime's shared arena keeps what a dropped session held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.runtime import OnnxModel

LONE_GAIN = 1.1  # a lone image must run this much faster on every core to be given them
BATCH_EFFICIENCY = 0.85  # wide batches must reach this share of `cores` one-thread runs to replace them
PROFILE_TIMEOUT_S = 600
LONE_SESSION_MB = 128  # default budget for the second session of ``both`` (CONVSERVE_LONE_SESSION_MB)
QUIET_CORES = 0.25  # a measurement is trusted when other processes used less CPU than this meanwhile
TRIES = 4  # measurements made at most, a second apart, waiting for a quiet machine
ENV = "CONVSERVE_PLACEMENT_FILE"  # profiles measured by the start-up check, for the workers

MODES = {
    "narrow": "one thread a run, one run per core",
    "wide": "one run at a time on every core",
    "both": "a lone image on every core (second session), batches one thread a run",
}


@dataclass(frozen=True)
class Profile:
    """Seconds (the fastest of several) of one image and of ``batch`` images, on 1 and on
    ``threads`` threads."""

    threads: int
    batch: int
    narrow_one: float
    wide_one: float
    narrow_batch: float | None = None  # measured only when a lone image gains from threads
    wide_batch: float | None = None
    busy_cores: float = 0.0  # CPU other processes used while it was measured (cores, on average)
    wide_mb: float = 0.0  # what a second session of the file costs (:func:`second_session_mb`)

    @property
    def lone_gain(self) -> float:
        """How much faster a lone image runs on ``threads`` threads than on one."""
        return self.narrow_one / self.wide_one if self.wide_one > 0 else 1.0

    @property
    def batch_efficiency(self) -> float | None:
        """Images per second of wide batches over those of ``threads`` one-thread runs at once."""
        if self.narrow_batch is None or not self.wide_batch:
            return None
        return self.narrow_batch / (self.threads * self.wide_batch)


@dataclass(frozen=True)
class Placement:
    """How a model runs: ``mode`` (:data:`MODES`) on ``cores`` cores, and why."""

    mode: str
    cores: int
    reason: str

    @property
    def session_threads(self) -> int:
        """Intra-op threads of the session that runs batches."""
        return self.cores if self.mode == "wide" else 1

    @property
    def lone_threads(self) -> int | None:
        """Intra-op threads of a second session for lone images (None: no second session)."""
        return self.cores if self.mode == "both" else None

    @property
    def runs(self) -> int:
        """Batches in flight at once."""
        return 1 if self.mode == "wide" else self.cores

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "batch_threads": self.session_threads, "lone_threads": self.lone_threads or
                self.session_threads, "runs": self.runs, "reason": self.reason}


def choose(profile: Profile, lone_session_mb: float = LONE_SESSION_MB) -> Placement:
    """The mode a profile calls for, with a second session allowed up to ``lone_session_mb``
    (see the module docstring)."""
    cores, gain = profile.threads, profile.lone_gain
    one = f"one image {profile.narrow_one * 1e3:.1f} ms on 1 thread, {profile.wide_one * 1e3:.1f} ms on {cores}"
    if profile.busy_cores >= QUIET_CORES:
        one += f" (other processes used {profile.busy_cores:.1f} cores meanwhile)"
    if gain < LONE_GAIN:
        return Placement("narrow", cores, f"{one}: a lone image gains only {gain:.2f}x from more threads")
    if profile.wide_mb <= lone_session_mb:
        return Placement("both", cores, f"{one}; a second session for lone images costs {profile.wide_mb:.0f} MB "
                                        f"(budget {lone_session_mb:.0f})")
    eff = profile.batch_efficiency
    over = f"a second session would cost {profile.wide_mb:.0f} MB (budget {lone_session_mb:.0f})"
    if eff is not None and eff >= BATCH_EFFICIENCY:
        return Placement("wide", cores, f"{one}; {over}; batches of {profile.batch} on {cores} threads run at "
                                        f"{eff:.2f} of {cores} one-thread runs")
    shown = "n/a" if eff is None else f"{eff:.2f}"
    return Placement("narrow", cores, f"{one}; {over}; batches of {profile.batch} on {cores} threads run at only "
                                      f"{shown} of {cores} one-thread runs")


def fixed(mode: str, cores: int, why: str) -> Placement:
    """A placement chosen without measuring (a setting, one core, a GPU)."""
    if cores <= 1 and mode != "narrow":
        return Placement("narrow", 1, "one core per worker")
    return Placement(mode, cores, why)


def _fastest(runs: list, reps: int) -> list[float]:
    """The fastest of ``reps`` timed calls of each of ``runs``, called in turn (after one
    untimed call each: the first run of a shape pays for set-up). The fastest, not the
    median, and in turn: whatever else the machine does then slows some calls of each, not
    all calls of one (measured: the median of a start-up check's runs once put ResNet-18's
    wide batches at 0.61 of their 1.02)."""
    for fn in runs:
        fn()
    best = [float("inf")] * len(runs)
    for _ in range(reps):
        for k, fn in enumerate(runs):
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def measure(path: Path, threads: int, batch: int, tries: int = TRIES, narrow: OnnxModel | None = None) -> Profile:
    """Time ``path`` on one thread and on ``threads`` threads, in this process (CPU); ``narrow``:
    the file already open on one thread on the CPU (the start-up check has it), not opened again.

    Threads only pay when there are idle cores to run them, so a measurement made while other
    processes were busy (servers starting beside this one, say) understates what they give:
    it is made again, a second apart, up to ``tries`` times, and the quietest one is kept
    (measured: a ResNet-18 profiled while another server warmed up showed no gain from two
    threads, 34.2 vs 34.6 ms, against 36 vs 19 ms on a quiet machine)."""
    import numpy as np  # not at import: the supervising process imports this module, never the model stack
    import psutil

    from core.runtime import OnnxModel

    me = psutil.Process()
    narrow = narrow or OnnxModel.load(path, "profile", "0", "cpu", 1)
    wide = OnnxModel.load(path, "profile", "0", "cpu", threads)
    i = narrow.contract.input
    size = min(batch, narrow.contract.batch.max_size or batch)
    images = np.full((size, i.height, i.width, i.channels), i.pad_value, np.uint8)
    one = images[:1]
    reps = 5 if _fastest([lambda: narrow.infer(one)], 1)[0] < 0.2 else 2
    best: Profile | None = None
    for attempt in range(max(1, tries)):
        if attempt:
            time.sleep(1.0)
        t0, all0, mine0 = time.perf_counter(), _busy_seconds(psutil.cpu_times()), _busy_seconds(me.cpu_times())
        narrow_one, wide_one = _fastest([lambda: narrow.infer(one), lambda: wide.infer(one)], reps)
        narrow_batch = wide_batch = None
        if narrow_one / wide_one >= LONE_GAIN and size > 1:
            narrow_batch, wide_batch = _fastest([lambda: narrow.infer(images), lambda: wide.infer(images)], 3)
        others = (_busy_seconds(psutil.cpu_times()) - all0) - (_busy_seconds(me.cpu_times()) - mine0)
        busy = max(0.0, others / max(time.perf_counter() - t0, 1e-6))
        profile = Profile(threads, size, narrow_one, wide_one, narrow_batch, wide_batch, round(busy, 2),
                          second_session_mb(path))
        if best is None or profile.busy_cores < best.busy_cores:
            best = profile
        if best.busy_cores < QUIET_CORES:
            break
    assert best is not None
    return best


def second_session_mb(path: Path) -> float:
    """What a second session of ``path`` adds to a worker: another copy of the weights and of
    ONNX Runtime's packed form of them, about twice the file (measured: ResNet-18, a 44.7 MB
    file, +86 MB; MobileNetV3-Large, 16.8 MB, +33 MB). An estimate from the file, not a
    measurement: a process that has held other sessions reuses their freed arena memory and
    shows less than a worker will hold."""
    return round(2 * path.stat().st_size / 2**20, 1)


def _busy_seconds(times) -> float:
    """CPU seconds spent working in ``psutil`` cpu_times (idle and I/O wait left out)."""
    return sum(getattr(times, f, 0.0) for f in ("user", "system", "nice", "irq", "softirq", "steal"))


def measure_in_child(path: Path, threads: int, batch: int) -> Profile:
    """:func:`measure` in a short-lived process (see the module docstring)."""
    src = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-m", "service.placement", str(path), "--threads", str(threads),
                        "--batch", str(batch)], capture_output=True, text=True, timeout=PROFILE_TIMEOUT_S,
                       env={**os.environ, "PYTHONPATH": pythonpath})
    if r.returncode != 0:
        raise RuntimeError(f"profiling {path} failed: {r.stderr.strip().splitlines()[-1:]}")
    return Profile(**json.loads(r.stdout.strip().splitlines()[-1]))


def file_key(path: Path) -> str:
    """A profile's key: the file and its identity (another file at the path is measured again)."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


def save_profiles(profiles: dict[str, Profile], path: Path) -> None:
    path.write_text(json.dumps({k: asdict(p) for k, p in profiles.items()}))


def load_profiles() -> dict[str, Profile]:
    """The profiles the start-up check measured (empty when there are none)."""
    name = os.environ.get(ENV)
    if not name:
        return {}
    try:
        return {k: Profile(**v) for k, v in json.loads(Path(name).read_text()).items()}
    except (OSError, ValueError, TypeError):
        return {}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Measure a model for service.placement; prints its profile as JSON.")
    p.add_argument("model", type=Path)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    profile = measure(a.model, a.threads, a.batch)
    print(json.dumps(asdict(profile)))
    print(choose(profile).reason, file=sys.stderr)


if __name__ == "__main__":
    main()
