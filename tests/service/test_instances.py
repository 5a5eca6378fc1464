"""The instance segmentation task served by the shipped shapes-instances model: /instances,
v2 and render=png answer what ONNX Runtime computes on the same pixels; the three mask formats
describe the same pixels; pycocotools scores served answers exactly as export.evaluate scores
the file; objects of one class that touch and overlap come back as separate instances."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from core.datasets import CocoDetection
from core.imaging import load_input
from core.metrics import coco_mask_metrics
from core.runtime import OnnxModel
from core.tasks import TASKS, coco_mask_results
from export.evaluate import evaluate
from tests.support.http import get, post, request
from tests.support.servers import SHIPPED_MODELS, Server
from training.synthetic import write_instances

MODEL = "shapes-instances"
PATH = SHIPPED_MODELS / MODEL / "1" / "model.onnx"


@pytest.fixture(scope="module")
def crowds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served-crowds")
    write_instances(out, 24, seed=31)
    return out


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel.load(PATH, MODEL, "1", "cpu", 1)


def _instances(server: Server, data: bytes, **fields: str) -> dict:
    status, _, body = post(server.url + "/instances", files={"image": ("i.jpg", data)},
                           fields={"model": MODEL, **fields})
    assert status == 200, body
    return body


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


def test_answers_equal_onnx_runtime_on_the_same_pixels(server: Server, model: OnnxModel, crowds: Path) -> None:
    options = {"score_threshold": 0.3, "max_detections": 100, "mask_format": "rle"}
    for path in sorted((crowds / "images").glob("*.jpg"))[:4]:
        _, arr, geometry = load_input(path, model.contract.input)
        (outputs,) = model.infer(arr[None])
        want = TASKS["instance_segmentation"].result(outputs, geometry, model.contract, options)["detections"]
        assert _instances(server, path.read_bytes())["detections"] == want and want, path.name


def test_the_three_mask_formats_describe_the_same_pixels(server: Server, crowds: Path) -> None:
    path = crowds / "images" / "000003.jpg"
    width, height = Image.open(path).size
    rle = _instances(server, path.read_bytes())["detections"]
    png = _instances(server, path.read_bytes(), mask_format="png")["detections"]
    polygons = _instances(server, path.read_bytes(), mask_format="polygon")["detections"]
    assert len(rle) == len(png) == len(polygons) > 1
    for a, b, c in zip(rle, png, polygons):
        full = _decode(a["rle"])
        assert full.shape == (height, width) and full.sum() == a["area"] == b["area"] == c["area"]
        x1, y1, x2, y2 = b["mask_box"]
        window = np.asarray(Image.open(io.BytesIO(base64.b64decode(b["mask_png"])))) > 127
        assert window.shape == (y2 - y1, x2 - x1)
        np.testing.assert_array_equal(full[y1:y2, x1:x2], window)
        assert full.sum() == window.sum()  # nothing outside the box
        drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(c["polygons"], height, width)))
        assert (drawn & full).sum() / max((drawn | full).sum(), 1) > 0.8  # a traced outline, not the pixels


def test_v2_answers_boxes_and_rle_masks(server: Server, crowds: Path) -> None:
    data = (crowds / "images" / "000001.jpg").read_bytes()
    found = _instances(server, data)["detections"]
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}],
           "outputs": [{"name": "detection_boxes"}, {"name": "detection_masks"}, {"name": "num_detections"}]}
    status, _, body = request(server.url, "POST", f"/v2/models/{MODEL}/infer", json.dumps(doc).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200, body
    out = {o["name"]: o for o in body["outputs"]}
    assert out["num_detections"]["data"] == [len(found)] and out["detection_masks"]["shape"] == [1, len(found)]
    assert [json.loads(m) for m in out["detection_masks"]["data"]] == [d["rle"] for d in found]
    np.testing.assert_allclose(np.array(out["detection_boxes"]["data"]).reshape(-1, 4), [d["box"] for d in found],
                               atol=1e-4)


def test_pycocotools_scores_served_answers_as_export_evaluate_scores_the_file(server: Server, crowds: Path) -> None:
    data = CocoDetection(crowds)
    category_of = dict(zip(data.classes, data.category_ids))
    results, ids = [], []
    for sample in data.samples:
        ids.append(sample.target.image_id)
        for d in _instances(server, sample.image.read_bytes(), score_threshold="0.001")["detections"]:
            results += coco_mask_results(sample.target.image_id, category_of[d["label"]], [d])
    served = coco_mask_metrics(data.coco, results, ids)
    scored = evaluate(PATH, crowds)
    assert served == pytest.approx({k: scored[k] for k in served}, abs=1e-9)
    assert served["mask_ap_50"] > 0.7  # a trained model: the masks land where pycocotools expects them


def test_touching_objects_of_one_class_come_back_apart(server: Server, crowds: Path) -> None:
    """Ground-truth pairs of one class whose masks touch or overlap: each object is matched by
    its own answered mask (IoU >= 0.5 with it, and better than with its neighbour's), and the
    two answered masks are different objects (their IoU stays low)."""
    data = CocoDetection(crowds)
    pairs = matched = 0
    for sample in data.samples:
        target = sample.target
        width, height = Image.open(sample.image).size
        truth = data.load_masks(target, (width, height)).astype(bool)
        found = _instances(server, sample.image.read_bytes(), score_threshold="0.3")["detections"]
        answered = [_decode(d["rle"]).astype(bool) for d in found]
        for i in range(len(truth)):
            for j in range(i + 1, len(truth)):
                grown = np.zeros_like(truth[i])
                grown[1:] |= truth[i][:-1]
                grown[:-1] |= truth[i][1:]
                grown[:, 1:] |= truth[i][:, :-1]
                grown[:, :-1] |= truth[i][:, 1:]
                if target.labels[i] != target.labels[j] or not (grown | truth[i])[truth[j]].any():
                    continue  # not a touching same-class pair
                pairs += 1
                ious = [[(a & t).sum() / max((a | t).sum(), 1) for a in answered] for t in (truth[i], truth[j])]
                if not answered:
                    continue
                bi, bj = int(np.argmax(ious[0])), int(np.argmax(ious[1]))
                if bi != bj and ious[0][bi] >= 0.5 and ious[1][bj] >= 0.5:
                    matched += 1
    assert pairs >= 10, pairs
    assert matched >= 0.7 * pairs, (matched, pairs)


def test_render_paints_each_instance_and_models_lists_it(server: Server, crowds: Path) -> None:
    data = (crowds / "images" / "000002.jpg").read_bytes()
    status, headers, png = post(server.url + "/instances", files={"image": ("i.jpg", data)},
                                fields={"model": MODEL, "render": "png"})
    assert status == 200 and headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    from service.render import MASK_ALPHA, colour

    found = _instances(server, data)["detections"]
    masks = [_decode(d["rle"]).astype(bool) for d in found]
    alone = np.sum(masks, axis=0) == 1  # pixels of exactly one object: blended once
    checked = 0
    for rank, mask in enumerate(masks):
        inside = mask & alone
        if inside.sum() < 20:
            continue  # (nearly) covered by other objects
        want = original[inside] * (1 - MASK_ALPHA) + np.array(colour(rank)) * MASK_ALPHA
        assert np.median(np.abs(drawn[inside] - want).sum(axis=1)) <= 3, rank  # box edges and labels aside
        checked += 1
    assert checked >= 2
    listed = get(server.url + "/models")[2]
    (info,) = [m for m in listed["models"] if m["name"] == MODEL]
    assert info["task"] == "instance_segmentation" and info["endpoint"] == "/instances"
