"""Prometheus metrics of our own, served on /metrics beside BentoML's.

bentoml.metrics is BentoML's multiprocess-safe drop-in for prometheus_client; metrics are
created lazily, so importing this module does no work.
"""

from __future__ import annotations

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
ERRORS = bentoml.metrics.Counter(
    name="convserve_errors_total",
    documentation="Requests answered with an error, by endpoint and error type",
    labelnames=["endpoint", "type"],
)


def observe_batch(model: str, size: int, seconds: float) -> None:
    BATCH_SIZE.labels(model=model).observe(size)
    INFERENCE_SECONDS.labels(model=model).observe(seconds)
