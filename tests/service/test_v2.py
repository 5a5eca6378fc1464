"""The Open Inference Protocol v2 with the real Triton client (tritonclient[http]) against the
live server: health, metadata, inference with BYTES images (binary and JSON) and with the
model's UINT8 tensor, the classification extension, version-specific calls; the answers are
the task endpoints' answers; bad requests are 4xx {"error": "..."} and the next one is served."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from core.imaging import load_input
from core.runtime import OnnxModel
from tests.support.http import post, request
from tests.support.images import jpeg, scene
from tests.support.servers import SHIPPED_MODELS


@pytest.fixture(scope="module")
def client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def _bytes_input(images: list[bytes], binary: bool = True) -> triton.InferInput:
    inp = triton.InferInput("images", [len(images)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    else:  # JSON strings cannot carry binary: the images go base64-encoded
        inp.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=object), binary_data=False)
    return inp


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "convserve" and {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    md = client.get_model_metadata("shapes-detector")
    assert md["name"] == "shapes-detector" and md["versions"] == ["1"] and md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 256, 256, 3]}]
    outputs = {o["name"]: o for o in md["outputs"]}
    assert outputs["boxes"] == {"name": "boxes", "datatype": "FP32", "shape": [-1, 100, 4]}
    assert outputs["detection_boxes"]["datatype"] == "FP32" and outputs["num_detections"]["datatype"] == "INT32"
    assert client.get_model_metadata("shapes-detector", "1") == md
    assert client.is_model_ready("shapes-classifier") and client.is_model_ready("shapes-classifier", "1")
    assert not client.is_model_ready("shapes-classifier", "9")
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} >= {("shapes-classifier", "READY"), ("shapes-segmenter", "READY")}


@pytest.mark.parametrize("binary", [True, False])
def test_detection_from_bytes_equals_detect(server, client, binary) -> None:
    images = [jpeg(scene(300 + i, 320, 240).image) for i in range(2)]
    result = client.infer("shapes-detector", [_bytes_input(images, binary)], outputs=[
        triton.InferRequestedOutput(n, binary_data=binary)
        for n in ("detection_boxes", "detection_scores", "detection_classes", "num_detections")])
    boxes, scores = result.as_numpy("detection_boxes"), result.as_numpy("detection_scores")
    classes, count = result.as_numpy("detection_classes"), result.as_numpy("num_detections")
    for i, data in enumerate(images):
        _, _, want = post(server.url + "/detect", {"image": ("a.jpg", data)})
        dets = want["detections"]
        assert count[i] == len(dets) > 0
        np.testing.assert_allclose(boxes[i, :count[i]], [d["box"] for d in dets], atol=1e-3)
        np.testing.assert_allclose(scores[i, :count[i]], [d["score"] for d in dets], atol=1e-6)
        assert classes[i, :count[i]].tolist() == [d["label_id"] for d in dets]
        assert (scores[i, count[i]:] == 0).all()  # padding to the request's largest count


def test_classification_extension_equals_classify(server, client) -> None:
    images = [jpeg(scene(310 + i, 200, 160, shapes=1).image) for i in range(3)]
    result = client.infer("shapes-classifier", [_bytes_input(images)],
                          outputs=[triton.InferRequestedOutput("logits", class_count=3)], model_version="1")
    got = result.as_numpy("logits")
    assert got.shape == (3, 3)
    for i, data in enumerate(images):
        _, _, want = post(server.url + "/classify", {"image": ("a.jpg", data)}, {"top_k": "3"})
        assert [v.decode() for v in got[i]] == [f"{x['score']}:{x['label_id']}:{x['label']}" for x in want["labels"]]


def test_uint8_tensor_in_raw_outputs_out(client) -> None:
    """A client that prepares images itself: the model's own tensor in, the graph's logits out."""
    model = OnnxModel.load(SHIPPED_MODELS / "shapes-classifier" / "1" / "model.onnx", "c", "1", "cpu", 1)
    arrays = np.stack([load_input(jpeg(scene(320 + i, 180, 140).image), model.contract.input)[1] for i in range(2)])
    inp = triton.InferInput("images", list(arrays.shape), "UINT8")
    inp.set_data_from_numpy(arrays)
    result = client.infer("shapes-classifier", [inp], outputs=[triton.InferRequestedOutput("logits")])
    want = np.stack([o["logits"] for o in model.infer(arrays)])
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
    inp = triton.InferInput("images", list(arrays.shape), "UINT8")
    inp.set_data_from_numpy(arrays, binary_data=False)  # as JSON integers
    np.testing.assert_allclose(client.infer("shapes-classifier", [inp]).as_numpy("logits"), want, rtol=1e-5, atol=1e-5)


def test_segmentation_class_map_equals_segment(server, client) -> None:
    data = jpeg(scene(330, 240, 200).image)
    result = client.infer("shapes-segmenter", [_bytes_input([data])],
                          outputs=[triton.InferRequestedOutput("class_map")])
    cmap = result.as_numpy("class_map")
    _, _, want = post(server.url + "/segment", {"image": ("a.jpg", data)}, {"mask_format": "png"})
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(want["mask_png"]))))
    assert cmap.shape == (1, 200, 240) and np.array_equal(cmap[0], png)


def test_all_outputs_by_default(client) -> None:
    result = client.infer("shapes-detector", [_bytes_input([jpeg(scene(340).image)])])
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert names == {"boxes", "scores", "labels", "detection_boxes", "detection_scores", "detection_classes",
                     "num_detections"}
    assert result.as_numpy("boxes").shape == (1, 100, 4)


def test_task_options_in_parameters(client) -> None:
    inp = _bytes_input([jpeg(scene(350).image)])
    low = client.infer("shapes-detector", [inp], outputs=[triton.InferRequestedOutput("num_detections")],
                       parameters={"score_threshold": 0.0, "max_detections": 7})
    assert low.as_numpy("num_detections")[0] == 7


def _error(call) -> str:
    with pytest.raises(InferenceServerException) as exc:
        call()
    return str(exc.value)


@pytest.mark.parametrize("make,status,message", [
    (lambda: (lambda i: (i.set_data_from_numpy(np.zeros((1, 128, 128, 3), np.float32)), i)[1])(
        triton.InferInput("images", [1, 128, 128, 3], "FP32")), 400, "datatype 'FP32' is not accepted"),
    (lambda: (lambda i: (i.set_data_from_numpy(np.zeros((1, 64, 64, 3), np.uint8)), i)[1])(
        triton.InferInput("images", [1, 64, 64, 3], "UINT8")), 400, "has the model's shape [N, 128, 128, 3]"),
    (lambda: _bytes_input([b"not an image"]), 400, "input 'images': the data is not an image"),
    (lambda: (lambda i: (i.set_data_from_numpy(np.array([b"!!"], dtype=object), binary_data=False), i)[1])(
        triton.InferInput("images", [1], "BYTES")), 400, "not valid base64"),
    (lambda: (lambda i: (i.set_data_from_numpy(np.zeros((1, 128, 128, 3), np.uint8)), i)[1])(
        triton.InferInput("pixels", [1, 128, 128, 3], "UINT8")), 400, "unknown input 'pixels'"),
])
def test_bad_requests_are_named_and_the_next_is_served(client, make, status, message) -> None:
    text = _error(lambda: client.infer("shapes-classifier", [make()]))
    assert f"[{status}]" in text and message in text, text
    result = client.infer("shapes-classifier", [_bytes_input([jpeg(scene(360).image)])])
    assert result.as_numpy("logits").shape == (1, 5)


def test_unknown_output_model_and_version(client) -> None:
    inp = _bytes_input([jpeg(scene(370).image)])
    text = _error(lambda: client.infer("shapes-classifier", [inp], outputs=[triton.InferRequestedOutput("boxes")]))
    assert "[400]" in text and "unknown output 'boxes'" in text and "logits" in text
    text = _error(lambda: client.infer("no-such-model", [inp]))
    assert "[404]" in text and "unknown model 'no-such-model'" in text
    text = _error(lambda: client.infer("shapes-classifier", [inp], model_version="3"))
    assert "[404]" in text and "no version '3'" in text
    text = _error(lambda: client.get_model_metadata("no-such-model"))
    assert "unknown model" in text


def test_hand_made_requests(server) -> None:
    """The protocol by hand: malformed JSON, a binary header length that lies, a JSON answer."""
    status, _, body = request(server.url, "POST", "/v2/models/shapes-classifier/infer", b"{not json",
                              {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]
    status, _, body = request(server.url, "POST", "/v2/models/shapes-classifier/infer", b'{"inputs": []}',
                              {"Content-Type": "application/json", "Inference-Header-Content-Length": "999"})
    assert status == 400 and "Inference-Header-Content-Length is 999" in body["error"]
    data = jpeg(scene(380).image)
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                       "data": [{"b64": base64.b64encode(data).decode()}]}],
           "outputs": [{"name": "logits", "parameters": {"classification": 2}}], "id": "req-7"}
    status, headers, body = request(server.url, "POST", "/v2/models/shapes-classifier/infer", json.dumps(doc).encode(),
                                    {"Content-Type": "application/json"})
    assert status == 200 and body["id"] == "req-7" and body["model_version"] == "1"
    (out,) = body["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 2] and out["data"][0].count(":") == 2
    status, _, body = request(server.url, "GET", "/v2/models/shapes-classifier/versions/1")
    assert status == 200 and body["inputs"][0]["name"] == "images"


def test_raw_outputs_of_different_shapes_have_no_batch_form() -> None:
    from service import v2
    from service.errors import V2Error

    same = [{"boxes": np.zeros((4, 4))}, {"boxes": np.ones((4, 4))}]
    assert v2.raw_tensor("boxes", same).shape == (2, 4, 4)
    ragged = [{"boxes": np.zeros((3, 4))}, {"boxes": np.zeros((5, 4))}]
    assert not v2.stackable("boxes", ragged)
    with pytest.raises(V2Error, match="different shape for each image"):
        v2.raw_tensor("boxes", ragged)
