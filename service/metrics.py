"""Prometheus metrics of our own, served on /metrics beside BentoML's.

bentoml.metrics is BentoML's multiprocess-safe drop-in for prometheus_client; metrics are
created lazily, so importing this module does no work.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import bentoml

INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="convserve_inference_seconds",
    documentation="ONNX Runtime time per batch, by model",
    labelnames=["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="convserve_batch_size",
    documentation="Images per ONNX Runtime run, by model",
    labelnames=["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
REQUEST_SECONDS = bentoml.metrics.Histogram(
    name="convserve_request_seconds",
    documentation="Whole request time inside the service (decode to JSON), by model and endpoint",
    labelnames=["model", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
QUEUE_WAIT = bentoml.metrics.Histogram(
    name="convserve_queue_wait_seconds",
    documentation="Time an image waited in its model's batch queue before its ONNX Runtime run began, by model",
    labelnames=["model"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
REBALANCED = bentoml.metrics.Counter(
    name="convserve_connections_rebalanced_total",
    documentation="Keep-alive connections closed by a worker holding more than its share (service.balancing)",
    labelnames=[],
)
# The autoscaling signal (deploy/fleet/prometheus/rules.yml, deploy/kubernetes): in BentoML's
# multiprocess mode a gauge is one file per worker; "livesum" adds up the live workers' values.
REQUESTS_IN_FLIGHT = bentoml.metrics.Gauge(
    name="convserve_requests_in_flight",
    documentation="Requests held now (being read, decoded, queued or run: admission slots taken), summed over "
                  "the live workers",
    labelnames=[],
    multiprocess_mode="livesum",
)
DROPPED = bentoml.metrics.Counter(
    name="convserve_dropped_images_total",
    documentation="Images dropped from a model's queue unrun because their request was cancelled or its client "
                  "went away, by model",
    labelnames=["model"],
)
ERRORS = bentoml.metrics.Counter(
    name="convserve_errors_total",
    documentation="Requests answered with an error, by endpoint and error type",
    labelnames=["endpoint", "type"],
)


@functools.cache
def _child(metric: object, *labels: str) -> Any:
    """A labelled child, looked up once (``.labels()`` takes a lock and builds a key each time)."""
    return metric.labels(*labels)  # type: ignore[attr-defined]


def observe_batch(model: str, size: int, seconds: float) -> None:
    """One ONNX Runtime run of ``size`` images that took ``seconds``."""
    _child(BATCH_SIZE, model).observe(size)
    _child(INFERENCE_SECONDS, model).observe(seconds)


def dropped(model: str, n: int) -> None:
    """``n`` queued images of ``model`` dropped unrun: their callers went away."""
    _child(DROPPED, model).inc(n)


def queue_wait(model: str, seconds: float) -> None:
    """One image waited ``seconds`` in ``model``'s batch queue (0 when it skipped the queue)."""
    _child(QUEUE_WAIT, model).observe(max(seconds, 0.0))


def answered(model: str, endpoint: str, seconds: float) -> None:
    """A request answered with 200 after ``seconds`` inside the service (BentoML's own
    bentoml_service_request_total counts every request by endpoint and status)."""
    _child(REQUEST_SECONDS, model, endpoint).observe(seconds)


def requests_in_flight(n: int) -> None:
    """This worker now holds ``n`` admitted requests (service.admission.Admission.requests)."""
    _forget_dead_workers(os.getpid())
    REQUESTS_IN_FLIGHT.set(n)


@functools.cache
def _forget_dead_workers(pid: int) -> bool:
    """Once per worker process (``pid``): drop the live-gauge files of workers that died without cleaning up
    (a kill -9, the OOM killer; BentoML's supervisor then starts a new worker but leaves the
    dead one's file), or "livesum" would count what the dead worker held forever."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder or not os.path.isdir(folder):
        return False
    from prometheus_client import multiprocess

    for name in os.listdir(folder):
        if not (name.startswith("gauge_live") and name.endswith(".db")):
            continue
        other = name[:-3].rpartition("_")[2]
        if other.isdigit() and int(other) != pid and not _alive(int(other)):
            multiprocess.mark_process_dead(int(other), folder)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rebalanced() -> None:
    """A keep-alive connection was closed to spread connections over the workers."""
    REBALANCED.inc()


def error(endpoint: str, type_: str) -> None:
    """A request answered with an error of ``type_`` (invalid_image, overloaded, ...)."""
    _child(ERRORS, endpoint, type_).inc()
