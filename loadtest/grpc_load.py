"""Closed-loop gRPC load on the v2 service, as cheap per call as Python allows: each request
is serialised once up front and sent as bytes through grpcio's generic stubs (the C core
does the rest), answers are checked for their status only. Run as its own process (the
benchmark's load must not share the server's interpreter); prints one JSON line.

- ``unary``: ``concurrency`` callers each send ModelInfer back to back;
- ``stream``: ``concurrency`` ModelStreamInfer streams, each with up to ``window`` frames in
  flight, answered in order (a camera feeding frames as fast as they are answered).

    python -m loadtest.grpc_load --target 127.0.0.1:8001 --model shapes-detector --images DIR \
        --concurrency 4 --seconds 10 [--mode stream --window 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import struct
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def infer_request(model: str, input_name: str, image: bytes) -> bytes:
    """A serialised ModelInferRequest: one encoded image as a BYTES [1] tensor (raw contents)."""
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype="BYTES", shape=[1])  # its data: raw_input_contents, as tritonclient
    req.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return req.SerializeToString()


def _identity(b: bytes) -> bytes:
    return b


async def _unary(channel: grpc.aio.Channel, requests: list[bytes], first: int, stop: float
                 ) -> tuple[list[float], int]:
    """One client sending ModelInfer calls back to back until ``stop`` (perf_counter), starting
    at request ``first``: its latencies (s) and failed calls."""
    call = channel.unary_unary(INFER, request_serializer=_identity, response_deserializer=_identity)
    latencies: list[float] = []
    errors, i = 0, first
    while time.perf_counter() < stop:
        t = time.perf_counter()
        try:
            await call(requests[i % len(requests)])
            latencies.append(time.perf_counter() - t)
        except grpc.aio.AioRpcError:
            errors += 1
        i += 1
    return latencies, errors


async def _stream(channel: grpc.aio.Channel, requests: list[bytes], first: int, stop: float, window: int
                  ) -> tuple[list[float], int]:
    """One ModelStreamInfer stream keeping ``window`` frames in flight until ``stop``: per-frame
    latencies (s) and frames answered with an error."""
    call = channel.stream_stream(STREAM, request_serializer=_identity, response_deserializer=_identity)
    latencies: list[float] = []
    errors = 0
    sent: asyncio.Queue[float] = asyncio.Queue()
    credits = asyncio.Semaphore(window)

    async def frames() -> Any:
        i = first
        while time.perf_counter() < stop:
            await credits.acquire()
            sent.put_nowait(time.perf_counter())
            yield requests[i % len(requests)]
            i += 1

    async for answer in call(frames()):
        t = sent.get_nowait()
        if pb.ModelStreamInferResponse.FromString(answer).error_message:
            errors += 1
        else:
            latencies.append(time.perf_counter() - t)
        credits.release()
    return latencies, errors


async def run(target: str, requests: list[bytes], mode: str, concurrency: int, seconds: float, window: int
              ) -> dict[str, Any]:
    options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    # One channel (HTTP/2 connection) per client, as separate client programs would have.
    channels = [grpc.aio.insecure_channel(target, options=options + [("grpc.channel_id", k)])
                for k in range(concurrency)]
    try:
        warm = channels[0].unary_unary(INFER, request_serializer=_identity, response_deserializer=_identity)
        await warm(requests[0])
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        stop = t0 + seconds
        results = await asyncio.gather(*(
            _unary(ch, requests, k, stop) if mode == "unary" else _stream(ch, requests, k, stop, window)
            for k, ch in enumerate(channels)))
        elapsed = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for ch in channels:
            await ch.close()
    latencies = np.array([x for lat, _ in results for x in lat]) * 1e3
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"mode": mode, "concurrency": concurrency, "seconds": round(elapsed, 2), "requests": len(latencies),
            "errors": sum(e for _, e in results), "req_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
            "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
            "client_cpu_s": round(cpu, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="host:port of the gRPC service")
    p.add_argument("--model", required=True)
    p.add_argument("--input-name", required=True, help="the model's input name (its v2 metadata)")
    p.add_argument("--images", type=Path, required=True, help="a folder of JPEG files, sent in turn")
    p.add_argument("--mode", choices=("unary", "stream"), default="unary")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--window", type=int, default=4, help="stream mode: frames in flight per stream")
    a = p.parse_args(argv)
    images = [f.read_bytes() for f in sorted(a.images.glob("*.jpg"))]
    requests = [infer_request(a.model, a.input_name, img) for img in images]
    print("GRPC_JSON " + json.dumps(asyncio.run(run(a.target, requests, a.mode, a.concurrency, a.seconds, a.window))))


if __name__ == "__main__":
    main()
