"""Service configuration, read once from environment variables (documented defaults).

| variable | default | meaning |
|---|---|---|
| CONVSERVE_MODEL_ROOT | <repo>/models | model repository: <name>/<version>/model.onnx, or one model (scan) |
| CONVSERVE_MODEL_NAME | file or folder name | the model's name when the root holds one (KServe's /mnt/models) |
| CONVSERVE_DEVICE | auto | auto (CUDA only if it really initialises) / cpu / cuda (fail if not) |
| CONVSERVE_WORKERS | ceil(cores / 4) | BentoML worker processes (machine_defaults) |
| CONVSERVE_INFERENCE_THREADS | cores / workers | one-thread ONNX Runtime runs at once per worker (batches in flight) |
| CONVSERVE_ORT_THREADS | cores / workers | intra-op threads of a run that uses every core (service.placement) |
| CONVSERVE_PLACEMENT | auto | how models use the cores: auto (measured per model), narrow, wide or both |
| CONVSERVE_LONE_SESSION_MB | 128 | memory a second session for lone images may cost per model (auto placement) |
| CONVSERVE_DECODE_THREADS | cores / workers | threads decoding uploads, per worker (bounds the pixels in flight) |
| CONVSERVE_MAX_BATCH | 8 on CPU, 32 on CUDA | largest batch the dynamic batcher forms |
| CONVSERVE_BATCH_TARGET_MS | auto | time a batch may take (auto: 4 one-image runs, >= 25 ms; service.batch_cost) |
| CONVSERVE_BATCH_WAIT_MS | 0 | how long an idle batcher waits for company (0: batch what is queued) |
| CONVSERVE_MAX_QUEUE | 64 | requests a worker holds (reading, decoding, queued, running); more wait, unread |
| CONVSERVE_ADMISSION_WAIT_MS | 1000 | how long a request waits, unread, for one of those slots before 503 |
| CONVSERVE_MAX_WAITING | 1024 | requests waiting for a slot per worker; beyond it, 503 at once |
| CONVSERVE_MAX_INFLIGHT_BYTES | 268435456 | request-body bytes a worker holds before 503 (256 MiB) |
| CONVSERVE_MAX_BYTES | 33554432 | largest request body (32 MiB) |
| CONVSERVE_MAX_PIXELS | 100000000 | largest image (width x height, from the header) |
| CONVSERVE_MAX_DECODED_BYTES | 4 x MAX_PIXELS | memory one image's decode may take (from its header) |
| CONVSERVE_MAX_IMAGES | 16 | images in one request |
| CONVSERVE_MAX_VIDEO_FRAMES | 1800 | frames one video request may decode, sampled or skipped (a minute at 30 fps) |
| CONVSERVE_MAX_VIDEO_PIXELS | 8294400 | largest video frame (3840 x 2160; a decoder holds up to 16 of them) |
| CONVSERVE_MAX_VIDEOS | decode threads | videos a worker decodes at once; more wait like requests, then 503 |
| CONVSERVE_HEAVY_PIXELS | 16000000 | larger images go to the heavy lane (own threads, lowest CPU priority) |
| CONVSERVE_HEAVY_THREADS | 1 | threads of the heavy lane, per worker |
| CONVSERVE_BODY_TIMEOUT_S | 30 | seconds a client has to send its request body (then 408) |
| CONVSERVE_POLL_S | 10 | seconds between looks at the model repository for changed versions (0: never) |
| CONVSERVE_GRACE_S | 25 | on SIGTERM, how long accepted requests may take before the worker exits anyway |
| CONVSERVE_API_KEYS / _FILE | unset | API keys (comma-separated, or a file with one a line), needed on most routes |
| CONVSERVE_ADMIN_KEYS / _FILE | unset | keys for POST /admin/reload (disabled without one) |
| CONVSERVE_AUTH_HEALTH | 0 | 1: health, readiness and metrics need an API key too |
| CONVSERVE_ACCESS_LOG | 0 | 1: one log line per inference request (method, path, status, ms, model, request id) |
| CONVSERVE_MAX_HEAD_BYTES | 65536 | largest request line + headers (64 KiB); more: 431, connection closed |
| CONVSERVE_HEAD_TIMEOUT_S | 10 | seconds from connecting (or a head's first byte) to the head's end; then closed |
| CONVSERVE_GRPC_PORT | 8001 | port of the v2 gRPC service, shared by every worker (0: no gRPC; service.grpc_v2) |
| CONVSERVE_GRPC_HOST | 0.0.0.0 | address the gRPC service listens on |
| CONVSERVE_GALLERY_URL | sqlite:///galleries.sqlite3 | galleries: sqlite:///<file> (the working directory's) |
|   |   | or postgresql://... (PostgreSQL with pgvector; service.galleries), or off |
| CONVSERVE_GALLERY_MAX_ITEMS | 250000 | items of all galleries together (each worker caches their vectors) |
| CONVSERVE_GALLERY_MAX_METADATA_BYTES | 4096 | an item's metadata, as compact JSON |
| CONVSERVE_KEEPALIVE_S | 5 | seconds an idle keep-alive connection stays open between requests (BentoML's default) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError

DEFAULT_MODEL_ROOT = Path(__file__).resolve().parent.parent / "models"
DEVICES = ("auto", "cpu", "cuda")
PLACEMENTS = ("auto", "narrow", "wide", "both")  # service.placement.MODES, or measured
DEFAULT_GALLERY_URL = "sqlite:///galleries.sqlite3"
GALLERY_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")
GALLERIES_OFF = "off"  # replicas that share no gallery store: the gallery routes answer 503
CORES_PER_WORKER = 4  # one worker's event loop answers ~4 cores' worth of light-model requests (README "Heavy models")


def _number(name: str, default: Any, minimum: Any, kind: type) -> Any:
    """The environment variable ``name`` as ``kind`` (int or float), at least ``minimum``;
    ``default`` when unset or empty; ConfigError naming it otherwise."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not value >= minimum:  # also refuses NaN
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _gallery_url() -> str:
    url = os.environ.get("CONVSERVE_GALLERY_URL", "").strip() or DEFAULT_GALLERY_URL
    if url != GALLERIES_OFF and (not url.startswith(GALLERY_SCHEMES) or url in GALLERY_SCHEMES):
        raise ConfigError(f"CONVSERVE_GALLERY_URL must be sqlite:///<file>, postgresql://... or off, got {url[:60]!r}")
    return url


def _int(name: str, default: int, minimum: int = 0) -> int:
    return _number(name, default, minimum, int)


def _float(name: str, default: float, minimum: float = 0.0) -> float:
    return _number(name, default, minimum, float)


def _port(name: str, default: int) -> int:
    port = _int(name, default, 0)
    if port > 65535:
        raise ConfigError(f"{name}={port} is not a port (0-65535)")
    return port


MIN_KEY_LENGTH = 16


def _keys(name: str) -> tuple[str, ...]:
    """Keys from ``name`` (comma-separated) and ``name``_FILE (one a line, # comments); each at
    least MIN_KEY_LENGTH printable characters."""
    raw = [k.strip() for k in os.environ.get(name, "").split(",")]
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={path!r} cannot be read: {exc.strerror or exc}") from None
        raw += [ln.strip() for ln in lines if not ln.strip().startswith("#")]
    keys = tuple(dict.fromkeys(k for k in raw if k))
    for i, key in enumerate(keys):
        if len(key) < MIN_KEY_LENGTH or not key.isprintable() or " " in key:
            raise ConfigError(f"{name}: key {i + 1} must be at least {MIN_KEY_LENGTH} printable characters without "
                              "spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys


def _model_name() -> str | None:
    """CONVSERVE_MODEL_NAME: a name a request can spell in a path (/v2/models/<name>/infer)."""
    name = os.environ.get("CONVSERVE_MODEL_NAME", "").strip()
    if not name:
        return None
    if len(name) > 128 or name.startswith(".") or any(c in name for c in "/\\:?#% ") or not name.isprintable():
        raise ConfigError(f"CONVSERVE_MODEL_NAME={name!r} must be at most 128 printable characters, not start with "
                          "'.', and hold none of / \\ : ? # % or spaces")
    return name


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
class MachineDefaults:
    """What the core count alone decides, and why (logged once at start-up)."""

    cores: int
    workers: int
    cores_per_worker: int

    @property
    def reason(self) -> str:
        return (f"{self.cores} core(s) for this process (affinity and cgroup quota): {self.workers} worker(s), one per "
                f"{CORES_PER_WORKER} cores or fewer, each with {self.cores_per_worker} core(s) for decoding and "
                "inference")


def machine_defaults(cores: int, workers: int | None = None) -> MachineDefaults:
    """Workers and cores per worker for ``cores`` cores (``workers`` when set): a worker per
    CORES_PER_WORKER cores, so that no event loop has to feed more cores than it can, and the
    cores shared evenly. 1 core: 1 worker with 1; 2: 1 with 2; 16: 4 workers with 4 each."""
    cores = max(1, cores)
    chosen = workers if workers else max(1, -(-cores // CORES_PER_WORKER))
    return MachineDefaults(cores, chosen, max(1, cores // chosen))


@dataclass(frozen=True)
class Settings:
    model_root: Path
    device: str
    workers: int
    inference_threads: int
    ort_threads: int
    decode_threads: int
    max_batch: int | None  # None: per device (see max_batch_for)
    batch_wait_ms: int
    max_requests: int  # CONVSERVE_MAX_QUEUE: requests a worker admits at once (service.admission)
    admission_wait_ms: int
    max_waiting: int
    max_inflight_bytes: int
    max_bytes: int
    max_pixels: int
    max_decoded_bytes: int | None  # what decoding one image may take; None: core.imaging's default
    max_images: int
    heavy_pixels: int
    heavy_threads: int
    body_timeout_s: int
    poll_s: float = 10.0
    max_video_frames: int = 1800
    max_video_pixels: int = 3840 * 2160
    max_videos: int = 1
    grace_s: float = 25.0
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    auth_health: bool = False
    access_log: bool = False
    max_head_bytes: int = 64 * 1024
    head_timeout_s: float = 10.0
    keepalive_s: float = 5.0
    model_name: str | None = None  # CONVSERVE_MODEL_NAME: the name of a repository of one model
    placement: str = "auto"  # CONVSERVE_PLACEMENT (service.placement)
    lone_session_mb: float = 128.0  # CONVSERVE_LONE_SESSION_MB (service.placement.choose)
    grpc_port: int = 0  # CONVSERVE_GRPC_PORT (0: no gRPC)
    grpc_host: str = "0.0.0.0"
    batch_target_ms: float | None = None  # None: service.batch_cost.default_target
    machine: MachineDefaults | None = None  # what the core count decided
    gallery_url: str = DEFAULT_GALLERY_URL  # CONVSERVE_GALLERY_URL (service.galleries)
    gallery_max_items: int = 250_000
    gallery_max_metadata_bytes: int = 4096

    def max_batch_for(self, providers: list[str]) -> int:
        """CONVSERVE_MAX_BATCH, or the default for where the model runs: on a CPU larger
        batches cost as much per image and hold more memory; a GPU needs them to be busy."""
        if self.max_batch:
            return self.max_batch
        return 32 if "CUDAExecutionProvider" in providers else 8

    @classmethod
    def from_env(cls) -> Settings:
        """Read every CONVSERVE_* variable; ConfigError naming the first invalid one."""
        device = os.environ.get("CONVSERVE_DEVICE", "auto").lower()
        if device not in DEVICES:
            raise ConfigError(f"CONVSERVE_DEVICE={device!r} must be one of {DEVICES}")
        placement = os.environ.get("CONVSERVE_PLACEMENT", "auto").lower() or "auto"
        if placement not in PLACEMENTS:
            raise ConfigError(f"CONVSERVE_PLACEMENT={placement!r} must be one of {PLACEMENTS}")
        machine = machine_defaults(available_cores(), _int("CONVSERVE_WORKERS", 0, 1) or None)
        per_worker = machine.cores_per_worker
        return cls(
            model_root=Path(os.environ.get("CONVSERVE_MODEL_ROOT") or DEFAULT_MODEL_ROOT),
            device=device,
            workers=machine.workers,
            inference_threads=_int("CONVSERVE_INFERENCE_THREADS", per_worker, 1),
            ort_threads=_int("CONVSERVE_ORT_THREADS", per_worker, 1),
            decode_threads=_int("CONVSERVE_DECODE_THREADS", per_worker, 1),
            max_batch=_int("CONVSERVE_MAX_BATCH", 0, 1) or None,
            batch_wait_ms=_int("CONVSERVE_BATCH_WAIT_MS", 0, 0),
            max_requests=_int("CONVSERVE_MAX_QUEUE", 64, 1),
            admission_wait_ms=_int("CONVSERVE_ADMISSION_WAIT_MS", 1000, 0),
            max_waiting=_int("CONVSERVE_MAX_WAITING", 1024, 0),
            max_inflight_bytes=_int("CONVSERVE_MAX_INFLIGHT_BYTES", 256 * 1024 * 1024, 1),
            max_bytes=_int("CONVSERVE_MAX_BYTES", 32 * 1024 * 1024, 1),
            max_pixels=_int("CONVSERVE_MAX_PIXELS", 100_000_000, 1),
            max_decoded_bytes=_int("CONVSERVE_MAX_DECODED_BYTES", 0, 0) or None,
            max_images=_int("CONVSERVE_MAX_IMAGES", 16, 1),
            heavy_pixels=_int("CONVSERVE_HEAVY_PIXELS", 16_000_000, 1),
            heavy_threads=_int("CONVSERVE_HEAVY_THREADS", 1, 1),
            body_timeout_s=_int("CONVSERVE_BODY_TIMEOUT_S", 30, 1),
            poll_s=_float("CONVSERVE_POLL_S", 10.0, 0.0),
            max_video_frames=_int("CONVSERVE_MAX_VIDEO_FRAMES", 1800, 1),
            max_video_pixels=_int("CONVSERVE_MAX_VIDEO_PIXELS", 3840 * 2160, 1),
            max_videos=_int("CONVSERVE_MAX_VIDEOS", per_worker, 1),
            grace_s=_float("CONVSERVE_GRACE_S", 25.0, 0.0),
            api_keys=_keys("CONVSERVE_API_KEYS"),
            admin_keys=_keys("CONVSERVE_ADMIN_KEYS"),
            auth_health=_int("CONVSERVE_AUTH_HEALTH", 0, 0) > 0,
            access_log=_int("CONVSERVE_ACCESS_LOG", 0, 0) > 0,
            max_head_bytes=_int("CONVSERVE_MAX_HEAD_BYTES", 64 * 1024, 1024),
            head_timeout_s=_float("CONVSERVE_HEAD_TIMEOUT_S", 10.0, 0.5),
            keepalive_s=_float("CONVSERVE_KEEPALIVE_S", 5.0, 0.5),
            model_name=_model_name(),
            placement=placement,
            lone_session_mb=_float("CONVSERVE_LONE_SESSION_MB", 128.0, 0.0),
            grpc_port=_port("CONVSERVE_GRPC_PORT", 8001),
            grpc_host=os.environ.get("CONVSERVE_GRPC_HOST", "").strip() or "0.0.0.0",
            batch_target_ms=_float("CONVSERVE_BATCH_TARGET_MS", 0.0, 0.0) or None,
            machine=machine,
            gallery_url=_gallery_url(),
            gallery_max_items=_int("CONVSERVE_GALLERY_MAX_ITEMS", 250_000, 1),
            gallery_max_metadata_bytes=_int("CONVSERVE_GALLERY_MAX_METADATA_BYTES", 4096, 2),
        )
