"""The keypoints task served by the shipped figures-keypoints model: /keypoints, v2 REST and
render=png answer what ONNX Runtime computes on the same pixels; pycocotools scores served
answers exactly as export.evaluate scores the file; a mirrored figure's keypoints come back
mirrored with left and right swapped; /models carries the skeleton."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from core.datasets import CocoDetection, keypoint_flip
from core.imaging import load_input
from core.metrics import coco_keypoint_metrics
from core.runtime import OnnxModel
from core.tasks import TASKS, coco_keypoint_results
from export.evaluate import evaluate
from tests.support.http import get, post, request
from tests.support.images import iou
from tests.support.servers import SHIPPED_MODELS, Server
from training.figures import write_keypoints

MODEL = "figures-keypoints"
PATH = SHIPPED_MODELS / MODEL / "1" / "model.onnx"


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served-figures")
    write_keypoints(out, 24, seed=31)
    return out


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel.load(PATH, MODEL, "1", "cpu", 1)


def _keypoints(server: Server, data: bytes, **fields: str) -> dict:
    status, _, body = post(server.url + "/keypoints", files={"image": ("f.jpg", data)},
                           fields={"model": MODEL, **fields})
    assert status == 200, body
    return body


def test_answers_equal_onnx_runtime_on_the_same_pixels(server: Server, model: OnnxModel, figures: Path) -> None:
    options = {"score_threshold": 0.3, "max_detections": 100}
    for path in sorted((figures / "images").glob("*.jpg"))[:4]:
        _, arr, geometry = load_input(path, model.contract.input)
        (outputs,) = model.infer(arr[None])
        want = TASKS["keypoints"].result(outputs, geometry, model.contract, options)["detections"]
        body = _keypoints(server, path.read_bytes())
        assert body["detections"] == want and want, path.name
        assert [k["name"] for k in want[0]["keypoints"]] == model.contract.keypoints.names


def test_v2_answers_the_same_objects_and_keypoints(server: Server, figures: Path) -> None:
    data = (figures / "images" / "000001.jpg").read_bytes()
    found = _keypoints(server, data)["detections"]
    import base64

    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}]}
    status, _, body = request(server.url, "POST", f"/v2/models/{MODEL}/infer", json.dumps(doc).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200, body
    out = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
    p = len(found[0]["keypoints"])
    assert out["detection_keypoints"].shape == (1, len(found), p, 3) and out["num_detections"].tolist() == [len(found)]
    want = np.array([[[k["x"], k["y"], k["score"]] for k in d["keypoints"]] for d in found])
    np.testing.assert_allclose(out["detection_keypoints"][0], want, atol=1e-4)
    np.testing.assert_allclose(out["detection_boxes"][0], [d["box"] for d in found], atol=1e-4)
    status, _, meta = get(server.url + f"/v2/models/{MODEL}")
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert shapes["detection_keypoints"] == ("FP32", [-1, -1, -1, 3])
    assert shapes["keypoints"] == ("FP32", [-1, 20, p, 3])  # the graph's own, in model-input pixels


def test_pycocotools_scores_served_answers_as_export_evaluate_scores_the_file(server: Server, figures: Path) -> None:
    """Served answers (score >= 0.001, top 20: COCO's keypoint protocol), converted with
    core.tasks.coco_keypoint_results and fed to pycocotools, give export.evaluate's figures."""
    data = CocoDetection(figures)
    results, ids = [], []
    for sample in data.samples:
        ids.append(sample.target.image_id)
        found = _keypoints(server, sample.image.read_bytes(), score_threshold="0.001",
                           max_detections="20")["detections"]
        results += coco_keypoint_results(sample.target.image_id, data.category_ids[0], found)
    served = coco_keypoint_metrics(data.coco, results, ids, data.sigmas)
    scored = evaluate(PATH, figures)
    assert served == pytest.approx({k: scored[k] for k in served}, abs=1e-9)
    assert served["oks_ap_50"] > 0.6  # a trained model: the conversion puts keypoints where pycocotools expects


def test_a_mirrored_figure_has_mirrored_keypoints(server: Server, figures: Path) -> None:
    """Each confident figure of the image has a twin in its mirror image (the box mirrored):
    the twin's left_hand is where the original's right_hand is, mirrored, and so on. The same
    keypoints compared without swapping left and right are far apart: the answer names sides
    from the figure's point of view, as COCO does."""
    listed = get(server.url + "/models")[2]
    (info,) = [m for m in listed["models"] if m["name"] == MODEL]
    names = info["keypoints"]["names"]
    flip = keypoint_flip(names)
    swapped, unswapped = [], []
    for path in sorted((figures / "images").glob("*.jpg"))[:8]:
        img = Image.open(path)
        width = img.width
        buf = io.BytesIO()
        ImageOps.mirror(img).save(buf, format="PNG")
        plain = _keypoints(server, path.read_bytes(), score_threshold="0.6")["detections"]
        mirrored = _keypoints(server, buf.getvalue(), score_threshold="0.1")["detections"]
        for d in plain:
            x1, y1, x2, y2 = d["box"]
            twin_box = [width - x2, y1, width - x1, y2]
            twin = max(mirrored, key=lambda m: iou(m["box"], twin_box))
            assert iou(twin["box"], twin_box) > 0.7, (path.name, d["box"], twin["box"])
            for i, k in enumerate(d["keypoints"]):
                if flip[i] == i:
                    continue  # the head: nothing to swap
                m, same = twin["keypoints"][flip[i]], twin["keypoints"][i]
                assert m["name"] == names[flip[i]]
                if k["score"] >= 0.5 and m["score"] >= 0.5:
                    swapped.append(np.hypot(width - k["x"] - m["x"], k["y"] - m["y"]))
                    unswapped.append(np.hypot(width - k["x"] - same["x"], k["y"] - same["y"]))
    assert len(swapped) > 50
    # in pixels, figures 60-250 px tall: mirrored (a model's own errors aside), and not by accident
    assert np.median(swapped) < 3.0 and np.median(unswapped) > 5 * np.median(swapped), (
        np.percentile(swapped, [50, 90]), np.percentile(unswapped, [50, 90]))


def test_render_draws_the_skeleton_and_models_lists_it(server: Server, model: OnnxModel, figures: Path) -> None:
    data = (figures / "images" / "000002.jpg").read_bytes()
    status, headers, png = post(server.url + "/keypoints", files={"image": ("f.jpg", data)},
                                fields={"model": MODEL, "render": "png"})
    assert status == 200 and headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    found = _keypoints(server, data)["detections"]
    for k in found[0]["keypoints"]:
        if k["score"] >= 0.3:  # service.render.KEYPOINT_DRAW_SCORE: a white dot on each drawn keypoint
            x, y = round(k["x"]), round(k["y"])
            assert (drawn[y, x] >= 240).all(), (k, drawn[y, x])
    assert (drawn != original).any(axis=-1).mean() > 0.01  # boxes, labels, edges
    status, _, listed = get(server.url + "/models")
    (info,) = [m for m in listed["models"] if m["name"] == MODEL]
    kp = model.contract.keypoints
    assert info["endpoint"] == "/keypoints" and info["task"] == "keypoints"
    assert info["keypoints"] == {"names": kp.names, "skeleton": kp.skeleton, "sigmas": kp.sigmas}
