"""The BentoML service: POST an image, get labels, boxes or masks; GET /models.

    bentoml serve service.service:ConvServe --port 3000

BentoML runs the server (workers, /livez, /readyz, /metrics, /docs.json, containerize);
the routes convserve answers live in service.app, which reads and parses its own request
bodies. Per worker: admission control (service.admission) -> body (service.uploads) ->
decode pool -> per-model dynamic batcher -> ONNX Runtime -> the task's result
(service.pipeline) -> JSON. Settings come from CONVSERVE_* environment variables
(service.settings); BentoML reads the worker count when it imports this module.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bentoml

from core.errors import ConfigError
from service import balancing, bentoml_patches, lifecycle, placement, tracing
from service.app import app
from service.auth import AuthMiddleware
from service.endpoints import ENDPOINTS
from service.errors import ErrorEnvelopeMiddleware
from service.pages import PagesMiddleware
from service.settings import Settings

log = logging.getLogger("convserve.service")
try:  # every BentoML/uvicorn workaround, in the supervisor and in each worker (service.bentoml_patches)
    bentoml_patches.apply_all()
except RuntimeError as exc:  # a BentoML upgrade: one line, not a traceback, and nothing starts
    raise SystemExit(f"convserve: cannot start: {exc}") from None


def _setup_logging() -> None:
    """BentoML configures its own loggers only; give ours a handler (text or JSON lines, with
    the request id) so start-up facts and request errors show."""
    root = logging.getLogger("convserve")
    if not root.handlers:
        root.addHandler(tracing.log_handler())
        root.setLevel(logging.INFO)
        root.propagate = False


def _settings_or_defaults() -> Settings | None:
    """The settings for the decorators below, which BentoML reads at import. Invalid settings
    count as the defaults here: the start-up check then reports them and stops the server."""
    try:
        return Settings.from_env()
    except ConfigError:
        return None


def _workers() -> int:
    s = _settings_or_defaults()
    return s.workers if s else 1


def _check_port_free(host: str, port: int) -> None:
    """Stop with one line when the gRPC port cannot be had: every worker would fail to bind
    it and be restarted for ever. The workers bind it with SO_REUSEPORT; so does this probe,
    so only another user's or a non-sharing socket refuses it."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"convserve: cannot start: CONVSERVE_GRPC_PORT={port} on {host} cannot be bound "
                             f"({exc.strerror}); choose another port, or 0 for no gRPC") from None


INFERENCE_ROUTES = [f"/{e.name}" for e in ENDPOINTS.values()]  # the hot paths (and v2's infer, below)

# The container image: no apt step, as every dependency is a wheel (bentoml_patches.DISTRO_REASON);
# the base image and the Python packages (bentofile.yaml / bentofile.gpu.yaml) as BentoML would pick them.
IMAGE = bentoml.images.Image(base_image="python:3.11-slim", distro=bentoml_patches.IMAGE_DISTRO, python_version="3.11")


@bentoml.service(
    name="convserve",
    image=IMAGE,
    workers=_workers(),
    # No max_concurrency: admission control sheds load before bodies are read, with our JSON.
    traffic={"timeout": 120},
    # BentoML's per-request OpenTelemetry span costs about 0.3 ms of CPU per request and is
    # dropped anyway unless tracing is configured (sample rate 0 by default): it is skipped on
    # the inference routes unless spans are exported (CONVSERVE_OTLP_ENDPOINT, service.tracing).
    tracing=tracing.bentoml_tracing_config([*INFERENCE_ROUTES, r"/v2/models/.*/infer"]),
    # BentoML's access log line (a synchronous write per request, without our request id) is
    # skipped on the inference routes; CONVSERVE_ACCESS_LOG=1 logs convserve's own line for
    # them instead (service.app, with the request id). BentoML's request metrics still count
    # them, and convserve_request_seconds / convserve_errors_total say how each ended.
    logging={"access": {"skip_paths": INFERENCE_ROUTES}},
)
@bentoml.asgi_app(app, path="/")
class ConvServe:
    """Classification, detection, segmentation and keypoints on ONNX Runtime; see README.md."""

    @bentoml.on_deployment
    def check_start_up() -> None:
        """Once, in ``bentoml serve``'s main process, before any worker starts: a bad setting
        or a broken repository stops the server with one line naming the problem (workers
        that failed instead would be restarted forever). The check runs in a child process
        so that this long-lived supervisor never loads the model stack."""
        src = str(Path(__file__).resolve().parent.parent)  # the checkout, or the Bento's src/ in a container
        pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        r = subprocess.run([sys.executable, "-m", "service.check"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": pythonpath})
        if r.returncode != 0:
            lines = r.stderr.strip().splitlines()
            raise SystemExit(lines[-1] if lines else f"convserve: start-up check failed ({r.returncode})")
        settings = _settings_or_defaults()
        if settings is not None and settings.grpc_port:
            _check_port_free(settings.grpc_host, settings.grpc_port)
        profiles = r.stdout.strip().splitlines()[-1:] or ["{}"]
        fd, name = tempfile.mkstemp(prefix="convserve-placement-", suffix=".json")
        with os.fdopen(fd, "w") as fh:  # the measured profiles, for the workers (service.placement)
            fh.write(profiles[0])
        os.environ[placement.ENV] = name
        atexit.register(Path(name).unlink, missing_ok=True)
        workers = _workers()
        if workers > 1:  # the workers, started after this hook, inherit the shared file's path
            path = balancing.create_file(workers)
            os.environ[balancing.ENV] = str(path)
            atexit.register(path.unlink, missing_ok=True)

    def __init__(self) -> None:
        import asyncio

        from service.admission import Admission
        from service.metrics import dropped, observe_batch
        from service.pipeline import Pipeline
        from service.repository import ModelRepository
        from service.uploads import Limits
        from service.worker import Worker, attach

        _setup_logging()
        s = Settings.from_env()
        repo = ModelRepository(s, on_batch=observe_batch, on_dropped=dropped)
        repo.warm_up_all()
        admission = Admission(s.max_requests, s.max_inflight_bytes, s.admission_wait_ms / 1e3, s.max_waiting)
        repo.runs.requests = lambda: admission.requests  # a lone image is one the worker holds alone
        # BentoML builds the service inside the worker's running event loop, in its main thread.
        loop = asyncio.get_running_loop()
        drain = lifecycle.Drain(lambda: admission.requests, lambda: self._stop_admitting(admission), s.grace_s)
        drain.install(loop)
        self.worker = Worker(
            settings=s, repo=repo, pipeline=Pipeline(repo, s), admission=admission,
            limits=Limits(max_bytes=s.max_bytes, max_images=s.max_images, timeout_s=s.body_timeout_s),
            balancer=balancing.Balancer.from_env(bentoml.server_context.worker_index - 1, s.workers), drain=drain)
        self.watcher = loop.create_task(repo.watch(s.poll_s)) if s.poll_s > 0 else None
        self.grpc = None
        if s.grpc_port:  # the v2 gRPC service, in this worker's event loop (service.grpc_v2)
            from core import __version__
            from service import grpc_v2

            self.grpc = grpc_v2.start(self.worker, s.grpc_host, s.grpc_port, __version__)
            self._grpc_started = loop.create_task(self._start_grpc())
        attach(app, self.worker)
        # What exists now lives as long as the worker: keep full collections from walking it.
        gc.collect()
        gc.freeze()
        log.info("ready: %d model(s) loaded and warmed up; %s", sum(len(v) for v in repo.models.values()),
                 s.machine.reason if s.machine else "")

    async def _start_grpc(self) -> None:
        from service import grpc_v2

        await self.grpc.start()
        await grpc_v2.set_serving(self.grpc, True)
        log.info("gRPC (Open Inference Protocol v2) on %s:%d", self.worker.settings.grpc_host,
                 self.worker.settings.grpc_port)

    def _stop_admitting(self, admission) -> None:
        """Draining: no new requests, and gRPC health says NOT_SERVING to load balancers."""
        admission.close()
        if self.grpc is not None:
            import asyncio

            from service import grpc_v2

            asyncio.get_running_loop().create_task(grpc_v2.set_serving(self.grpc, False))

    def is_ready(self) -> bool:
        """Every model loaded and warmed up, and not shutting down."""
        return self.worker.is_ready()

    def __is_ready__(self) -> bool:
        return self.is_ready()


_settings = _settings_or_defaults()
# Outermost first: every answer carries its request id, even a refusal for a missing key.
ConvServe.add_asgi_middleware(tracing.RequestIdMiddleware)
ConvServe.add_asgi_middleware(AuthMiddleware, api_keys=_settings.api_keys if _settings else (),
                              admin_keys=_settings.admin_keys if _settings else (),
                              protect_health=_settings.auth_health if _settings else False)
ConvServe.add_asgi_middleware(PagesMiddleware)
ConvServe.add_asgi_middleware(ErrorEnvelopeMiddleware, skip_posts_to=tuple(INFERENCE_ROUTES), v2_prefixes=("/v2",))
