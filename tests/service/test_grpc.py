"""The v2 gRPC service (service.grpc_v2) through the real clients: tritonclient.grpc (sync, aio
and its streaming API), KServe's InferenceGRPCClient and grpc.health.v1, against the real
server; answers equal to REST v2's for the same pixels."""

from __future__ import annotations

import asyncio
import io
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.utils import InferenceServerException

from loadtest.processes import free_port
from tests.support.http import post, request
from tests.support.images import jpeg, scene
from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server

pytestmark = pytest.mark.slow
KEY = "grpc-test-key-0123456789"
MODELS = {"classification": "shapes-classifier", "detection": "shapes-detector", "segmentation": "shapes-segmenter",
          "keypoints": "figures-keypoints", "instance_segmentation": "shapes-instances",
          "embedding": "shapes-identities"}
_DETECTIONS = [("detection_boxes", None), ("detection_scores", None), ("detection_classes", None),
               ("num_detections", None)]
TASK_OUTPUTS = {
    "classification": [("logits", 3)],
    "detection": _DETECTIONS,
    "segmentation": [("class_map", None)],
    "keypoints": [*_DETECTIONS, ("detection_keypoints", None)],
    "instance_segmentation": [*_DETECTIONS, ("detection_masks", None)],
    "embedding": [("embedding", None)],
}


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    port = free_port()
    log = tmp_path_factory.mktemp("grpc") / "serve.log"
    srv = start_server(SHIPPED_MODELS, log, env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_GRPC_PORT": str(port),
                                                 "CONVSERVE_GRPC_HOST": "127.0.0.1"})
    yield srv, f"127.0.0.1:{port}"
    stop_server(srv.proc)


@pytest.fixture(scope="module")
def client(grpc_server: tuple[Server, str]) -> tg.InferenceServerClient:
    c = tg.InferenceServerClient(grpc_server[1])
    _wait_serving(c)
    return c


def _wait_serving(c: tg.InferenceServerClient) -> None:
    import time

    for _ in range(60):
        try:
            if c.is_server_ready():
                return
        except InferenceServerException:
            pass
        time.sleep(0.5)
    raise AssertionError("the gRPC service never answered")


def _image(seed: int = 3) -> bytes:
    return jpeg(scene(seed, 320, 240).image)


def _bytes_input(images: list[bytes]) -> tg.InferInput:
    inp = tg.InferInput("images", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object))
    return inp


def _outputs(task: str) -> list[tg.InferRequestedOutput]:
    return [tg.InferRequestedOutput(name, class_count=k or 0) for name, k in TASK_OUTPUTS[task]]


def _rest_v2(url: str, model: str, task: str, images: list[bytes]) -> dict[str, np.ndarray]:
    """The same request over REST v2 (JSON, base64 images), its outputs as arrays."""
    import base64
    import json

    outputs = [{"name": n, **({"parameters": {"classification": k}} if k else {})} for n, k in TASK_OUTPUTS[task]]
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                       "data": [base64.b64encode(i).decode() for i in images]}], "outputs": outputs}
    status, _, body = request(url, "POST", f"/v2/models/{model}/infer", json.dumps(doc).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200, body
    out = {}
    for o in body["outputs"]:
        data = o["data"]
        arr = np.array([d.encode() for d in data], dtype=object) if o["datatype"] == "BYTES" else np.array(data)
        out[o["name"]] = arr.reshape(o["shape"])
    return out


def test_health_and_metadata(client: tg.InferenceServerClient, grpc_server: tuple[Server, str]) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("shapes-detector") and client.is_model_ready("shapes-detector", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "convserve" and "classification" in meta["extensions"]
    grpc_meta = client.get_model_metadata("shapes-segmenter", as_json=True)
    status, _, rest_meta = request(grpc_server[0].url, "GET", "/v2/models/shapes-segmenter")
    assert status == 200
    assert grpc_meta["name"] == rest_meta["name"] and grpc_meta["versions"] == rest_meta["versions"]
    for kind in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in grpc_meta[kind]] == \
               [(t["name"], t["datatype"], t["shape"]) for t in rest_meta[kind]]
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["state"]) for m in index} == {(m, "READY") for m in MODELS.values()}
    with grpc.insecure_channel(grpc_server[1]) as channel:  # what a load balancer asks
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("task", list(MODELS))
def test_bytes_jpeg_answers_equal_rest(client: tg.InferenceServerClient, grpc_server: tuple[Server, str],
                                       task: str) -> None:
    images = [_image(3), _image(4)]
    result = client.infer(MODELS[task], [_bytes_input(images)], outputs=_outputs(task), request_id="req-7")
    assert result.get_response().id == "req-7"
    rest = _rest_v2(grpc_server[0].url, MODELS[task], task, images)
    for name, _ in TASK_OUTPUTS[task]:
        got = result.as_numpy(name)
        assert got.shape == rest[name].shape, name
        if got.dtype == object:
            assert got.tolist() == rest[name].tolist()
        else:
            np.testing.assert_allclose(got, rest[name], rtol=1e-6, atol=1e-6)


def test_embeddings_as_tensors_equal_the_embed_endpoint(client: tg.InferenceServerClient,
                                                        grpc_server: tuple[Server, str]) -> None:
    """v2 users get an embedding model's vectors as an FP32 [N, D] tensor: /embed's answer."""
    images = [_image(6), _image(7)]
    result = client.infer("shapes-identities", [_bytes_input(images)], outputs=_outputs("embedding"))
    got = result.as_numpy("embedding")
    assert got.dtype == np.float32 and got.shape == (2, 128)
    for image, vector in zip(images, got):
        status, _, body = post(grpc_server[0].url + "/embed", files={"image": ("i.jpg", image)},
                               fields={"model": "shapes-identities"})
        assert status == 200, body
        np.testing.assert_allclose(vector, body["embedding"], atol=2e-6)
        assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5


@pytest.mark.parametrize("task", list(MODELS))
def test_uint8_tensor_answers_equal_rest(client: tg.InferenceServerClient, grpc_server: tuple[Server, str],
                                         task: str) -> None:
    meta = client.get_model_metadata(MODELS[task], as_json=True)
    h, w, c = (int(d) for d in meta["inputs"][0]["shape"][1:])
    arr = np.asarray(Image.open(io.BytesIO(_image(5))).convert("RGB").resize((w, h)), np.uint8)[None]
    inp = tg.InferInput("images", list(arr.shape), "UINT8")
    inp.set_data_from_numpy(arr)
    result = client.infer(MODELS[task], [inp], outputs=_outputs(task))
    import json

    outputs = [{"name": n, **({"parameters": {"classification": k}} if k else {})} for n, k in TASK_OUTPUTS[task]]
    doc = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(arr.shape),
                       "data": arr.reshape(-1).tolist()}], "outputs": outputs}
    status, _, body = request(grpc_server[0].url, "POST", f"/v2/models/{MODELS[task]}/infer",
                              json.dumps(doc).encode(), {"Content-Type": "application/json"})
    assert status == 200, body
    for o in body["outputs"]:
        got = result.as_numpy(o["name"])
        if o["datatype"] == "BYTES":
            assert [g.decode() for g in got.reshape(-1)] == o["data"]
        else:
            np.testing.assert_allclose(got.reshape(-1), np.array(o["data"]), rtol=1e-6, atol=1e-6)


def test_a_stream_of_fifty_frames_is_answered_in_order(client: tg.InferenceServerClient) -> None:
    frames = [_image(100 + i) for i in range(50)]
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, frame in enumerate(frames):
            client.async_stream_infer("shapes-classifier", [_bytes_input([frame])], request_id=str(i),
                                      outputs=_outputs("classification"))
        got = [answers.get(timeout=60) for _ in frames]
    finally:
        client.stop_stream()
    assert [e for _, e in got] == [None] * 50
    assert [r.get_response().id for r, _ in got] == [str(i) for i in range(50)]
    single = client.infer("shapes-classifier", [_bytes_input([frames[7]])], outputs=_outputs("classification"))
    assert got[7][0].as_numpy("logits").tolist() == single.as_numpy("logits").tolist()


def test_a_bad_frame_is_answered_on_the_stream_which_goes_on(client: tg.InferenceServerClient) -> None:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("shapes-classifier", [_bytes_input([b"not an image"])], request_id="bad")
        client.async_stream_infer("shapes-classifier", [_bytes_input([_image(9)])], request_id="good")
        (_, bad_error), (good, good_error) = answers.get(timeout=30), answers.get(timeout=30)
    finally:
        client.stop_stream()
    assert bad_error is not None and "INVALID_ARGUMENT" in str(bad_error) and "image" in str(bad_error)
    assert good_error is None and good.get_response().id == "good"


def _status(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def test_malformed_requests_get_client_fault_codes_and_the_next_is_served(client: tg.InferenceServerClient) -> None:
    image = _image(11)
    wrong_name = tg.InferInput("pixels", [1], "BYTES")
    wrong_name.set_data_from_numpy(np.array([image], dtype=object))
    floats = tg.InferInput("images", [1, 2], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 2), np.float32))
    cases = {
        "unknown model": (lambda: client.infer("no-such-model", [_bytes_input([image])]), "StatusCode.NOT_FOUND"),
        "wrong input": (lambda: client.infer("shapes-classifier", [wrong_name]), "StatusCode.INVALID_ARGUMENT"),
        "wrong datatype": (lambda: client.infer("shapes-classifier", [floats]), "StatusCode.INVALID_ARGUMENT"),
        "not an image": (lambda: client.infer("shapes-classifier", [_bytes_input([b"\x89PNG nope"])]),
                         "StatusCode.INVALID_ARGUMENT"),
        "too many images": (lambda: client.infer("shapes-classifier", [_bytes_input([image] * 17)]),
                            "StatusCode.INVALID_ARGUMENT"),
        "unknown output": (lambda: client.infer("shapes-classifier", [_bytes_input([image])],
                                                outputs=[tg.InferRequestedOutput("nope")]),
                           "StatusCode.INVALID_ARGUMENT"),
        "wrong task option": (lambda: client.infer("shapes-detector", [_bytes_input([image])],
                                                   parameters={"score_threshold": 2.0}),
                              "StatusCode.INVALID_ARGUMENT"),
    }
    for what, (call, code) in cases.items():
        status, message = _status(call)
        assert status == code, (what, status, message)
        assert message, what
    assert client.infer("shapes-classifier", [_bytes_input([image])]).as_numpy("logits") is not None


def test_the_asyncio_client(grpc_server: tuple[Server, str]) -> None:
    async def main() -> list[str]:
        c = tga.InferenceServerClient(grpc_server[1])
        try:
            results = await asyncio.gather(*(c.infer("shapes-classifier", [_bytes_input([_image(20 + i)])],
                                                     outputs=_outputs("classification"), request_id=str(i))
                                             for i in range(8)))
            return [r.get_response().id for r in results]
        finally:
            await c.close()

    assert asyncio.run(main()) == [str(i) for i in range(8)]


def test_request_ids_travel_in_metadata(grpc_server: tuple[Server, str]) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(grpc_server[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest(), metadata=(("x-request-id", "abc-123"),))
        assert ("x-request-id", "abc-123") in call.initial_metadata()
        _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest())
        made = dict(call.initial_metadata())["x-request-id"]
        assert len(made) == 32


def test_keys_are_needed_when_set(tmp_path) -> None:
    port = free_port()
    srv = start_server(SHIPPED_MODELS, tmp_path / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_GRPC_PORT": str(port), "CONVSERVE_GRPC_HOST":
                            "127.0.0.1", "CONVSERVE_API_KEYS": KEY},
                       ready_headers={"Authorization": f"Bearer {KEY}"})
    try:
        c = tg.InferenceServerClient(f"127.0.0.1:{port}")
        status, message = _status(lambda: c.infer("shapes-classifier", [_bytes_input([_image(1)])]))
        assert status == "StatusCode.UNAUTHENTICATED" and "key" in message
        status, _ = _status(lambda: c.infer("shapes-classifier", [_bytes_input([_image(1)])],
                                            headers={"authorization": "Bearer wrong-key-000000000"}))
        assert status == "StatusCode.UNAUTHENTICATED"
        ok = c.infer("shapes-classifier", [_bytes_input([_image(1)])], headers={"authorization": f"Bearer {KEY}"})
        assert ok.as_numpy("logits") is not None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # health stays open, as /livez does
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop_server(srv.proc)


def test_a_grpc_port_that_cannot_be_had_stops_the_server_with_one_line(tmp_path) -> None:
    """Held by a socket that does not share it: every worker would fail to bind and be
    restarted for ever, so bentoml serve stops at once instead."""
    import os
    import socket
    import subprocess
    import sys

    from tests.support.servers import ROOT

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "CONVSERVE_GRPC_PORT": str(port), "CONVSERVE_GRPC_HOST": "127.0.0.1",
               "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
        r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:ConvServe", "--host",
                            "127.0.0.1", "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=180)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).strip().splitlines()[-1] == (
        f"convserve: cannot start: CONVSERVE_GRPC_PORT={port} on 127.0.0.1 cannot be bound (Address already in "
        "use); choose another port, or 0 for no gRPC")


KSERVE_PYTHON = Path(__file__).resolve().parents[2] / ".tools" / "kserve" / "bin" / "python"
# Runs in KServe's own environment (kserve 0.21 needs a Starlette that BentoML 1.4.39 does not
# accept): its InferenceGRPCClient against the server; prints what it got as JSON.
KSERVE_SCRIPT = r"""
import asyncio, json, sys
import grpc, numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput

async def main(target, jobs):
    client = InferenceGRPCClient(url=target)
    report = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
              "model_ready": await client.is_model_ready("shapes-detector"), "answers": []}
    for job in jobs:
        if job["kind"] == "BYTES":
            data = [open(p, "rb").read() for p in job["files"]]
            inp = InferInput("images", [len(data)], "BYTES", data)
        else:
            arr = np.load(job["files"][0])
            inp = InferInput("images", list(arr.shape), "UINT8")
            inp.set_data_from_numpy(arr)
        outputs = [RequestedOutput(n, {"classification": k} if k else None) for n, k in job["outputs"]]
        try:
            res = await client.infer(InferRequest(job["model"], [inp], request_outputs=outputs))
            report["answers"].append({o.name: [o.datatype, o.shape, [x.decode() if isinstance(x, bytes) else x
                                                                     for x in o.as_numpy().ravel().tolist()]]
                                      for o in res.outputs})
        except grpc.RpcError as err:
            report["answers"].append({"error": err.code().name})
    await client.close()
    print("KSERVE_JSON " + json.dumps(report))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


@pytest.mark.skipif(not KSERVE_PYTHON.exists(), reason="KServe's client is not installed: python3 -m venv "
                    ".tools/kserve && .tools/kserve/bin/pip install kserve==0.21.0 (.ci/run does)")
def test_kserve_inference_grpc_client(client: tg.InferenceServerClient, grpc_server: tuple[Server, str],
                                      tmp_path: Path) -> None:
    """KServe's own InferenceGRPCClient: health, a BYTES JPEG (typed contents) and the model's
    UINT8 tensor (raw contents) for every task, answers equal to REST v2's; an unknown model is
    NOT_FOUND."""
    import json
    import subprocess

    jobs, expected = [], []
    for i, (task, model) in enumerate(MODELS.items()):
        files = [tmp_path / f"{task}-{k}.jpg" for k in range(2)]
        for k, f in enumerate(files):
            f.write_bytes(_image(20 + k))
        outputs = TASK_OUTPUTS[task]
        jobs.append({"model": model, "kind": "BYTES", "files": [str(f) for f in files], "outputs": outputs})
        expected.append(_rest_v2(grpc_server[0].url, model, task, [f.read_bytes() for f in files]))
        meta = client.get_model_metadata(model, as_json=True)
        h, w, c = (int(d) for d in meta["inputs"][0]["shape"][1:])
        arr = np.random.default_rng(i).integers(0, 256, (1, h, w, c), dtype=np.uint8)
        np.save(tmp_path / f"{task}.npy", arr)
        jobs.append({"model": model, "kind": "UINT8", "files": [str(tmp_path / f"{task}.npy")], "outputs": outputs})
        inp = tg.InferInput("images", list(arr.shape), "UINT8")
        inp.set_data_from_numpy(arr)
        triton = client.infer(model, [inp], outputs=_outputs(task))
        expected.append({n: triton.as_numpy(n) for n, _ in outputs})
    jobs.append({"model": "no-such-model", "kind": "BYTES", "files": jobs[0]["files"], "outputs": []})
    out = subprocess.run([str(KSERVE_PYTHON), "-c", KSERVE_SCRIPT, grpc_server[1], json.dumps(jobs)],
                         capture_output=True, text=True, timeout=120)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("KSERVE_JSON ")), None)
    assert line, out.stderr[-3000:]
    report = json.loads(line.removeprefix("KSERVE_JSON "))
    assert report["live"] and report["ready"] and report["model_ready"]
    *answers, unknown = report["answers"]
    assert unknown == {"error": "NOT_FOUND"}
    for got, want in zip(answers, expected, strict=True):
        for name, arr in want.items():
            datatype, shape, values = got[name]
            assert shape == list(arr.shape), name
            if arr.dtype == object:
                assert values == [v.decode() for v in arr.ravel().tolist()], name
            else:
                np.testing.assert_allclose(values, arr.ravel(), rtol=1e-6, atol=1e-6, err_msg=name)
