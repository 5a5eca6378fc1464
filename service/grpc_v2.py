"""The Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService`` on
CONVSERVE_GRPC_PORT, served by every worker beside REST, from the same repository, admission,
limits, batchers and API keys.

The messages are Triton's (``tritonclient.grpc.service_pb2``, the definitions
tritonclient.grpc and perf tools speak; KServe's ``grpc_predict_v2.proto`` is the same
service, package and field numbers for the RPCs they share), so no copy of the protocol
lives here. Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer, ModelStreamInfer and RepositoryIndex; the others answer UNIMPLEMENTED.

- **Inputs**: one tensor named like the model's input, BYTES of shape [N] (encoded images,
  decoded exactly as the task endpoints do) or the model's UINT8 [N, H, W, C], in typed
  ``contents`` or ``raw_input_contents`` (BYTES raw: each element a 4-byte little-endian
  length, then its bytes, as Triton sends them). service.v2.input_tensor checks both forms,
  for REST and gRPC alike.
- **Outputs**: as REST v2 (service.v2.response_tensors), always as
  ``raw_output_contents``, the form tritonclient reads; the classification extension via
  the output parameter ``classification``; task options (``score_threshold``, ...) as
  request parameters.
- **Errors** become status codes by the HTTP status the same fault gets over REST
  (:data:`CODE_OF_STATUS`): INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, RESOURCE_EXHAUSTED
  (a full worker, with ``retry-after`` in the trailing metadata), UNAVAILABLE while draining;
  never UNKNOWN. A model that fails is INTERNAL, as it is a 500 over REST.
- **Streams**: ModelStreamInfer answers each request of a stream in order on the stream,
  running up to STREAM_WINDOW of them at once (a slow reader holds back its own stream only:
  gRPC's flow control stops reading it while its answers wait); requests of every stream and
  RPC share the batchers.
- **Keys**: with CONVSERVE_API_KEYS set, every RPC needs ``authorization: Bearer <key>``
  (or ``x-api-key``) in its metadata; the ``grpc.health.v1`` service stays open, as
  /livez does. **Request ids**: ``x-request-id`` in the metadata is echoed in the initial
  metadata (one is made when absent), and ModelInferRequest.id comes back in the response.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from core.errors import ModelNotFound
from core.repository import parse_model_path, version_key
from service import metrics, tracing, v2
from service.auth import KeyRing, presented_key
from service.endpoints import TASK_ENDPOINTS
from service.errors import V2Error, client_error
from service.worker import Worker

log = logging.getLogger("convserve.grpc")
SERVICE = "inference.GRPCInferenceService"
STREAM_WINDOW = 8  # requests of one stream in flight at once (ModelStreamInfer)

# The gRPC code of each HTTP status the REST side answers for the same fault.
CODE_OF_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Refusal(Exception):
    """A fault with its gRPC code, message and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, trailers


def refusal(exc: Exception, draining: bool) -> Refusal:
    """What a failed RPC answers (see the module docstring)."""
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, V2Error):
        return Refusal(CODE_OF_STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), exc.message)
    known = client_error(exc)
    if known is None:
        log.exception("a gRPC request failed")
        return Refusal(grpc.StatusCode.INTERNAL, "the model failed on this input; the server log has details")
    trailers = tuple((k.lower(), v) for k, v in known.headers.items())
    if known.status == 503 and draining:
        return Refusal(grpc.StatusCode.UNAVAILABLE, known.message, trailers)
    return Refusal(CODE_OF_STATUS.get(known.status, grpc.StatusCode.INVALID_ARGUMENT), known.message, trailers)


def _parameter(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def infer_request(request: pb.ModelInferRequest, served: Any, max_images: int) -> v2.InferRequest:
    """A ModelInferRequest as the REST side's parsed request; V2Error naming the problem."""
    spec = served.model.contract.input
    if len(request.inputs) != 1:
        raise v2.bad(f"'inputs' must list exactly one tensor, named {spec.name!r}")
    tensor = request.inputs[0]
    if tensor.name != spec.name:
        raise v2.bad(f"unknown input {tensor.name!r}: this model's input is {spec.name!r}")
    where = f"input {tensor.name!r}"
    if len(request.raw_input_contents) > 1:
        raise v2.bad(f"{len(request.raw_input_contents)} raw_input_contents for one input")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    contents = tensor.contents
    field = {"BYTES": "bytes_contents", "UINT8": "uint_contents"}.get(tensor.datatype)
    if raw is not None and field is not None and len(getattr(contents, field)):
        raise v2.bad(f"{where}: give contents or raw_input_contents, not both")

    def elements(count: int) -> list[Any]:
        values = list(getattr(contents, field)) if field else []
        if len(values) != count:
            raise v2.bad(f"{where}: contents hold {len(values)} elements; its shape says {count}")
        return values

    images, arrays = v2.input_tensor(tensor.datatype, list(tensor.shape), raw, elements, served, max_images, where)
    return v2.InferRequest(request.id or None, images, arrays, _outputs(request, served), _options(request, served),
                           explicit=bool(request.outputs))


def _outputs(request: pb.ModelInferRequest, served: Any) -> list[v2.Requested]:
    raw = [{"name": o.name, "parameters": {k: _parameter(p) for k, p in o.parameters.items()}}
           for o in request.outputs] or None
    return v2.requested_outputs(raw, served, default_binary=True)


def _options(request: pb.ModelInferRequest, served: Any) -> dict[str, str]:
    endpoint = TASK_ENDPOINTS[served.model.contract.task]
    params = {k: _parameter(p) for k, p in request.parameters.items()}
    return {o.name: v2.option_text(params[o.name]) for o in endpoint.options
            if o.name != "model" and o.name in params}


def infer_response(served: Any, request_id: str | None, tensors: list[tuple[v2.Requested, np.ndarray]]
                   ) -> pb.ModelInferResponse:
    """The outputs as raw_output_contents (BYTES length-prefixed, numbers little-endian)."""
    response = pb.ModelInferResponse(model_name=served.model.name, model_version=served.model.version,
                                     id=request_id or "")
    for req, arr in tensors:
        datatype = v2.TO_V2.get(arr.dtype.name, "BYTES")
        response.outputs.add(name=req.name, datatype=datatype, shape=list(arr.shape))
        blob = v2.bytes_binary(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).astype(
            arr.dtype.newbyteorder("<"), copy=False).tobytes()
        response.raw_output_contents.append(blob)
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs, for one worker (see the module docstring)."""

    def __init__(self, worker: Worker, version: str) -> None:
        self.worker, self.version = worker, version
        s = worker.settings
        self.keys = KeyRing(s.api_keys + s.admin_keys)

    # --- every RPC ------------------------------------------------------------------------

    async def _enter(self, context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
        """Keys and the request id, before anything else; aborts the RPC without a good key.
        Returns the call's (text) metadata."""
        metadata = [(k, v) for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)]
        request_id = next((v for k, v in metadata if k == "x-request-id" and 0 < len(v) <= 128 and v.isprintable()),
                          None) or uuid.uuid4().hex
        tracing.REQUEST_ID.set(request_id)  # this call's log lines carry it
        await context.send_initial_metadata((("x-request-id", request_id),))
        if self.keys and not self.keys.accepts(presented_key([(k.encode(), v.encode("latin-1", "replace"))
                                                               for k, v in metadata])):
            await self._abort(context, Refusal(grpc.StatusCode.UNAUTHENTICATED,
                                               "this server needs an API key: metadata 'authorization: Bearer <key>'"))
        return metadata

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        r = refusal(exc, self.worker.drain.draining)
        if r.trailers:
            context.set_trailing_metadata(r.trailers)
        await context.abort(r.code, r.message)

    def _served(self, name: str, version: str) -> Any:
        try:
            return self.worker.repo.lookup(name, version or None)
        except ModelNotFound as exc:
            raise Refusal(grpc.StatusCode.NOT_FOUND, str(exc)) from None

    async def _model(self, context: grpc.aio.ServicerContext, name: str, version: str) -> Any:
        """The model a metadata RPC names; aborts the RPC with NOT_FOUND."""
        try:
            return self._served(name, version)
        except Refusal as exc:
            await self._abort(context, exc)

    # --- health and metadata --------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        await self._enter(context)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        await self._enter(context)
        return pb.ServerReadyResponse(ready=self.worker.is_ready())

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        await self._enter(context)
        await self._model(context, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.worker.is_ready())

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        await self._enter(context)
        doc = v2.server_metadata(self.version)
        return pb.ServerMetadataResponse(name=doc["name"], version=doc["version"], extensions=doc["extensions"])

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        await self._enter(context)
        served = await self._model(context, request.name, request.version)
        versions = sorted(self.worker.repo.models.get(request.name, {}), key=version_key)
        doc = v2.model_metadata(served, versions)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc["outputs"]])

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        await self._enter(context)
        index = pb.RepositoryIndexResponse()
        for m in self.worker.repo.describe():
            index.models.add(name=m["name"], version=m["version"], state="READY")
        for e in self.worker.repo.refused():
            _, name, version = parse_model_path(Path(e["path"]))
            index.models.add(name=name, version=version, state="UNAVAILABLE", reason=e["error"])
        return index

    # --- inference ------------------------------------------------------------------------

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One request, admitted like a REST one; raises what the client should hear."""
        w = self.worker
        served = self._served(request.model_name, request.model_version)
        size = request.ByteSize()
        ticket = await w.admission.admit(size)
        try:
            if size <= v2.INLINE_BYTES:
                parsed = infer_request(request, served, w.settings.max_images)
            else:
                parsed = await w.pipeline.in_pool(infer_request, request, served, w.settings.max_images)
            tensors, inferred = await v2.run(w.pipeline, served, parsed)
            metrics.answered(served.ref, "grpc", inferred.inferred - inferred.started)
            return infer_response(served, parsed.id, tensors)
        finally:
            ticket.release()

    async def frame(self, request: pb.ModelInferRequest, metadata: list[tuple[str, str]]) -> pb.ModelInferResponse:
        """One request of a stream, in a span of its own."""
        with tracing.rpc_span("grpc ModelStreamInfer", metadata, model=request.model_name, id=request.id):
            return await self.infer(request)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        metadata = await self._enter(context)
        try:
            with tracing.rpc_span("grpc ModelInfer", metadata, model=request.model_name):
                return await self.infer(request)
        except Exception as exc:
            await self._abort(context, exc)
            raise  # not reached: abort raises

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        metadata = await self._enter(context)
        # Up to STREAM_WINDOW requests of the stream run at once (their images batch together),
        # answered in order; the stream is read no further ahead, so a client that does not
        # read its answers stops its own stream (gRPC's flow control), nobody else's.
        started: asyncio.Queue[tuple[pb.ModelInferRequest, asyncio.Future] | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await started.put((request, asyncio.ensure_future(self.frame(request, metadata))))
            finally:
                await started.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await started.get()) is not None:
                request, answer = item
                try:
                    response = await answer
                except Exception as exc:
                    r = refusal(exc, self.worker.drain.draining)
                    # A fault in one frame is answered on the stream, which goes on (Triton's shape).
                    yield pb.ModelStreamInferResponse(
                        error_message=f"{r.code.name}: {r.message}",
                        infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))
                    continue
                yield pb.ModelStreamInferResponse(infer_response=response)
            await reader
        finally:  # the client went away (or the stream failed): its queued frames are dropped unrun
            reader.cancel()
            while not started.empty():
                item = started.get_nowait()
                if item is not None:
                    item[1].cancel()


def start(worker: Worker, host: str, port: int, version: str) -> grpc.aio.Server:
    """A gRPC server on ``host:port`` in this worker's event loop (every worker binds the port,
    SO_REUSEPORT spreads connections), with the v2 service and grpc.health.v1."""
    limit = worker.settings.max_bytes + 64 * 1024  # the REST body limit, plus the message's own fields
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 256 * 1024 * 1024)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(worker, version), server)
    checker = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{port}")
    server._convserve_health = checker  # type: ignore[attr-defined]
    return server


async def set_serving(server: grpc.aio.Server, serving: bool) -> None:
    """Tell grpc.health.v1 clients (load balancers) whether this worker serves: the server as a
    whole ("") and the v2 service."""
    checker = server._convserve_health  # type: ignore[attr-defined]
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        result = checker.set(name, status)
        if hasattr(result, "__await__"):
            await result
