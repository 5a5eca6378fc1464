"""Service configuration, read once from environment variables (documented defaults).

| variable | default | meaning |
|---|---|---|
| CONVSERVE_MODEL_ROOT | <repo>/models | model repository: <name>/<version>/model.onnx |
| CONVSERVE_DEVICE | auto | auto (CUDA only if it really initialises) / cpu / cuda (fail if not) |
| CONVSERVE_WORKERS | 1 | BentoML worker processes |
| CONVSERVE_ORT_THREADS | cores / workers | ONNX Runtime intra-op threads per session |
| CONVSERVE_MAX_BATCH | 16 | largest batch the dynamic batcher forms |
| CONVSERVE_BATCH_WAIT_MS | 2 | how long an idle batcher waits for company |
| CONVSERVE_MAX_QUEUE | 256 | queued images per model before requests get 503 |
| CONVSERVE_MAX_BYTES | 33554432 | largest upload (32 MiB) |
| CONVSERVE_MAX_PIXELS | 100000000 | largest image (width x height, after header parse) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError

DEFAULT_MODEL_ROOT = Path(__file__).resolve().parent.parent / "models"
DEVICES = ("auto", "cpu", "cuda")


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def available_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (``docker run --cpus 2`` on a 16-core host is 2, not 16)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


@dataclass(frozen=True)
class Settings:
    model_root: Path
    device: str
    workers: int
    ort_threads: int
    max_batch: int
    batch_wait_ms: int
    max_queue: int
    max_bytes: int
    max_pixels: int

    @classmethod
    def from_env(cls) -> "Settings":
        """Read every CONVSERVE_* variable; ConfigError naming the first invalid one."""
        device = os.environ.get("CONVSERVE_DEVICE", "auto").lower()
        if device not in DEVICES:
            raise ConfigError(f"CONVSERVE_DEVICE={device!r} must be one of {DEVICES}")
        workers = _int("CONVSERVE_WORKERS", 1, 1)
        return cls(
            model_root=Path(os.environ.get("CONVSERVE_MODEL_ROOT") or DEFAULT_MODEL_ROOT),
            device=device,
            workers=workers,
            ort_threads=_int("CONVSERVE_ORT_THREADS", max(1, available_cores() // workers), 1),
            max_batch=_int("CONVSERVE_MAX_BATCH", 16, 1),
            batch_wait_ms=_int("CONVSERVE_BATCH_WAIT_MS", 2, 0),
            max_queue=_int("CONVSERVE_MAX_QUEUE", 256, 1),
            max_bytes=_int("CONVSERVE_MAX_BYTES", 32 * 1024 * 1024, 1),
            max_pixels=_int("CONVSERVE_MAX_PIXELS", 100_000_000, 1),
        )
