"""Every architecture of training.models, exported, is served with no code changes: classic
classifiers with embeddings and class activation maps, a greyscale LeNet-5, FCN and DeepLabV3
segmenters, Faster R-CNN (one image per graph call), both instance segmenters and both keypoint models
through the real server."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from core.imaging import load_input
from core.runtime import OnnxModel
from tests.support.archs import ARCHS
from tests.support.http import MULTIPART, get, multipart_body, post, request
from tests.support.images import jpeg, scene
from tests.support.servers import Server, start_server, stop_server

CLASSIFIERS = [a for t, a, *_ in ARCHS if t == "classification"]


@pytest.fixture(scope="module")
def arch_server(tiny_arch_repo, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("arch-server") / "serve.log"
    srv = start_server(tiny_arch_repo["repo"], log, env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_POLL_S": "0"})
    yield srv
    stop_server(srv.proc)


def _name(arch: str) -> str:
    return arch.replace("_", "-")


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_classifiers_answer_labels_embeddings_and_heatmaps(arch_server, tiny_arch_repo, arch) -> None:
    image = jpeg(scene(70, 150, 110, shapes=1).image)
    status, _, body = post(arch_server.url + "/classify", {"image": ("a.jpg", image)},
                           {"model": _name(arch), "top_k": "2", "cam": "true"})
    assert status == 200, body
    assert len(body["labels"]) == 2 and body["model"]["name"] == _name(arch)
    for label in body["labels"]:
        heat = Image.open(io.BytesIO(base64.b64decode(label["heatmap_png"])))
        assert heat.mode == "L" and heat.size == (150, 110)
    model = OnnxModel.load(tiny_arch_repo["repo"] / _name(arch) / "1" / "model.onnx", arch, "1", "cpu", 1)
    _, arr, _ = load_input(image, model.contract.input)
    want = model.infer(arr[None])[0]["embedding"].astype(np.float64)
    status, _, body = post(arch_server.url + "/embed", {"image": ("a.jpg", image)}, {"model": _name(arch)})
    assert status == 200, body
    got = np.array(body["embedding"])
    assert body["dimensions"] == want.shape[0] and abs(np.linalg.norm(got) - 1) < 1e-5
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-5)


def test_greyscale_lenet_gets_uploads_converted(arch_server, tiny_arch_repo) -> None:
    """An RGB upload to a one-channel model: the service converts it as the training loader
    does, and answers what the graph answers on those pixels."""
    model = OnnxModel.load(tiny_arch_repo["repo"] / "lenet5" / "1" / "model.onnx", "lenet5", "1", "cpu", 1)
    image = jpeg(scene(71, 96, 80, shapes=1).image)
    _, arr, _ = load_input(image, model.contract.input)
    assert arr.shape == (32, 32, 1)
    logits = model.infer(arr[None])[0]["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    status, _, body = post(arch_server.url + "/classify", {"image": ("a.jpg", image)},
                           {"model": "lenet5", "top_k": "5"})
    assert status == 200, body
    for item in body["labels"]:
        assert item["score"] == pytest.approx(probs[item["label_id"]], abs=2e-6)
    models = {m["name"]: m for m in get(arch_server.url + "/models")[2]["models"]}
    assert models["lenet5"]["input"]["channels"] == 1 and models["lenet5"]["input"]["color"] == "L"
    assert models["lenet5"]["endpoints"] == ["/classify", "/embed"] and models["lenet5"]["outputs"]["cam"] == "cam"


@pytest.mark.parametrize("arch", ["fpn_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50",
                                  "deeplabv3_resnet50"])
def test_segmenters_are_served(arch_server, arch) -> None:
    image = {"image": ("s.jpg", jpeg(scene(80, 120, 90).image))}
    status, _, body = post(arch_server.url + "/segment", image, {"model": _name(arch), "mask_format": "png"})
    assert status == 200, body
    cmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert cmap.shape == (90, 120) and cmap.max() <= 5


def test_faster_rcnn_is_served_one_image_per_graph_call(arch_server) -> None:
    """A graph that takes exactly one image still answers a request of several, in order."""
    images = [jpeg(scene(90 + i, 160, 120).image) for i in range(3)]
    options = [("model", None, b"fasterrcnn-mobilenet-v3-large-320-fpn"), ("score_threshold", None, b"0")]
    body = multipart_body([("image", f"{i}.jpg", data) for i, data in enumerate(images)] + options)
    status, _, answer = request(arch_server.url, "POST", "/detect", body, MULTIPART)
    assert status == 200, answer
    assert len(answer["results"]) == 3 and answer["timing"]["batch_size"] == 1
    for result in answer["results"]:
        assert result["image"] == {"width": 160, "height": 120, "format": "JPEG"}
        for d in result["detections"]:
            assert 0 <= d["box"][0] <= d["box"][2] <= 160 and 0 <= d["box"][1] <= d["box"][3] <= 120
            assert d["label"] in ("circle", "square", "triangle", "hexagon", "star")


def test_faster_rcnn_over_v2_answers_task_tensors_for_several_images(arch_server) -> None:
    """A one-image-per-call graph's raw outputs may differ in shape per image (as many boxes as
    it found): without named outputs the answer carries the task tensors, always batched."""
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(arch_server.url.removeprefix("http://"))
    inp = triton.InferInput("images", [3], "BYTES")
    inp.set_data_from_numpy(np.array([jpeg(scene(95 + i, 160, 120).image) for i in range(3)], dtype=object))
    result = client.infer("fasterrcnn-mobilenet-v3-large-320-fpn", [inp], parameters={"score_threshold": 0.0})
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert {"detection_boxes", "num_detections"} <= names
    assert result.as_numpy("num_detections").shape == (3,)
    assert result.as_numpy("detection_boxes").shape[:1] == (3,)


def _served_and_computed(arch_server, tiny_arch_repo, arch: str, endpoint: str, task: str, images: list[bytes]
                         ) -> tuple[OnnxModel, list[tuple[list[dict], list[dict]]]]:
    """Three images in one request to ``endpoint`` (score_threshold 0, top 5), and for each
    image the objects it answered beside what ONNX Runtime computes on the same pixels."""
    from core.tasks import TASKS

    model = OnnxModel.load(tiny_arch_repo["repo"] / _name(arch) / "1" / "model.onnx", arch, "1", "cpu", 1)
    options = {**TASKS[task].defaults, "score_threshold": 0.0, "max_detections": 5}
    body = multipart_body([("image", f"{i}.jpg", data) for i, data in enumerate(images)]
                          + [("model", None, _name(arch).encode()), ("score_threshold", None, b"0"),
                             ("max_detections", None, b"5")])
    status, _, answer = request(arch_server.url, "POST", f"/{endpoint}", body, MULTIPART)
    assert status == 200, answer
    pairs = []
    for data, result in zip(images, answer["results"]):
        _, arr, geometry = load_input(data, model.contract.input)
        (outputs,) = model.infer(arr[None])
        want = TASKS[task].result(outputs, geometry, model.contract, options)["detections"]
        assert len(result["detections"]) == len(want) > 0
        for got, exp in zip(result["detections"], want):
            assert got["box"] == pytest.approx(exp["box"], abs=0.02) and got["label"] == exp["label"]
        pairs.append((result["detections"], want))
    return model, pairs


@pytest.mark.parametrize("arch", [a for t, a, *_ in ARCHS if t == "keypoints"])
def test_keypoint_models_answer_what_onnx_runtime_computes(arch_server, tiny_arch_repo, arch) -> None:
    """CenterNet's pose variant (a batch per graph call) and Keypoint R-CNN (one image per call)
    answer three images in one request with ONNX Runtime's objects and keypoints."""
    from training.figures import render_figures

    images = [jpeg(render_figures(np.random.default_rng(i), 200, 160, 2, 0)[0]) for i in range(3)]
    model, pairs = _served_and_computed(arch_server, tiny_arch_repo, arch, "keypoints", "keypoints", images)
    for found, want in pairs:
        for got, exp in zip(found, want):
            assert [k["name"] for k in got["keypoints"]] == model.contract.keypoints.names
            np.testing.assert_allclose([(k["x"], k["y"]) for k in got["keypoints"]],
                                       [(k["x"], k["y"]) for k in exp["keypoints"]], atol=0.02)


@pytest.mark.parametrize("arch", [a for t, a, *_ in ARCHS if t == "instance_segmentation"])
def test_instance_models_answer_what_onnx_runtime_computes(arch_server, tiny_arch_repo, arch) -> None:
    """CenterNet with YOLACT's masks (a batch per graph call) and Mask R-CNN (one image per
    call) answer three images in one request with ONNX Runtime's objects and masks."""
    images = [jpeg(scene(120 + i, 200, 160).image) for i in range(3)]
    _, pairs = _served_and_computed(arch_server, tiny_arch_repo, arch, "instances", "instance_segmentation", images)
    for found, want in pairs:
        for got, exp in zip(found, want):
            assert got["rle"]["size"] == [160, 200] and abs(got["area"] - exp["area"]) <= 0.01 * exp["area"] + 2
