"""The real BentoML server on the shipped models, over real HTTP on loopback."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtest.images import decompression_bomb_png
from tests.support.http import get, post
from tests.support.images import iou, jpeg, scene
from tests.support.servers import start_server, stop_server
from training.synthetic import SHAPES, render_scene

pytestmark = pytest.mark.slow  # every test talks to a server it starts


def _ok(server) -> None:
    """The server still answers a normal request."""
    status, _, body = post(server.url + "/classify", {"image": ("x.jpg", jpeg(scene(1).image))})
    assert status == 200, body


def test_health_and_models(server) -> None:
    assert get(server.url + "/livez")[0] == 200
    assert get(server.url + "/readyz")[0] == 200
    status, _, body = get(server.url + "/models")
    assert status == 200
    tasks = {m["task"]: m for m in body["models"]}
    assert set(tasks) == {"classification", "detection", "segmentation", "instance_segmentation", "keypoints",
                          "embedding"}
    for m in body["models"]:
        assert m["providers"] == ["CPUExecutionProvider"] and m["version"] == "1" and m["default_version"]
        assert bool(m["labels"]) == (m["task"] != "embedding") and m["input"]["height"] > 0
    assert tasks["embedding"]["embedding"] == {"dimension": 128, "metric": "cosine"}
    assert tasks["embedding"]["endpoint"] == "/embed"


def test_start_up_logs_the_providers_each_model_got(server) -> None:
    text = server.log_text()
    for name in ("shapes-classifier", "shapes-detector", "shapes-segmenter"):
        line = rf"loaded {name}:1 \(\w+\) from \S+model.onnx on \['CPUExecutionProvider'\]"
        assert re.search(line, text), text[-2000:]


def test_classify_right_class(server) -> None:
    rng = np.random.default_rng(123)
    correct = 0
    for i in range(10):
        cid = i % len(SHAPES)
        img = render_scene(rng, 160, 140, 1, 30, 60, class_ids=[cid]).image
        status, _, body = post(server.url + "/classify", {"image": ("s.jpg", jpeg(img))}, {"top_k": "3"})
        assert status == 200, body
        assert len(body["labels"]) == 3 and body["image"] == {"width": 160, "height": 140, "format": "JPEG"}
        assert body["model"] == {"name": "shapes-classifier", "version": "1"}
        scores = [lab["score"] for lab in body["labels"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= x <= 1 for x in scores) and sum(scores) <= 1.000001
        correct += body["labels"][0]["label"] == SHAPES[cid]
    assert correct >= 9


def _true_boxes(sc):
    return [(list(inst.bbox_xyxy), SHAPES[inst.class_id]) for inst in sc.instances]


def test_detect_boxes_overlap_the_true_ones(server) -> None:
    found = total = 0
    for seed in range(5):
        sc = scene(1000 + seed, 320, 240)
        status, _, body = post(server.url + "/detect", {"image": ("d.jpg", jpeg(sc.image))}, {"score_threshold": "0.3"})
        assert status == 200, body
        for box, label in _true_boxes(sc):
            total += 1
            found += any(d["label"] == label and iou(d["box"], box) >= 0.5 for d in body["detections"])
        for d in body["detections"]:
            assert 0 <= d["box"][0] <= d["box"][2] <= 320 and 0 <= d["box"][1] <= d["box"][3] <= 240
    assert found / total >= 0.8, (found, total)


def test_detect_parameters_are_applied(server) -> None:
    data = jpeg(scene(1001).image)
    _, _, many = post(server.url + "/detect", {"image": ("d.jpg", data)},
                      {"score_threshold": "0.0", "max_detections": "7"})
    assert len(many["detections"]) == 7
    scores = [d["score"] for d in many["detections"]]
    assert scores == sorted(scores, reverse=True)


def test_exif_rotated_upload_gives_rotated_coordinates(server) -> None:
    sc = scene(2024, 320, 240)
    upright = jpeg(sc.image)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer rotates 90 deg clockwise
    stored = sc.image.transpose(Image.Transpose.ROTATE_90)  # so the displayed image is the upright one
    rotated = jpeg(stored, exif=exif)
    _, _, a = post(server.url + "/detect", {"image": ("u.jpg", upright)})
    _, _, b = post(server.url + "/detect", {"image": ("r.jpg", rotated)})
    assert a["image"]["width"] == b["image"]["width"] == 320 and b["image"]["height"] == 240
    assert a["detections"]
    for d in a["detections"]:
        assert any(iou(d["box"], e["box"]) > 0.8 and d["label"] == e["label"] for e in b["detections"])


def test_segment_masks_match_the_truth(server) -> None:
    """Decoded RLE masks equal the model's own class map (same ONNX file run in process) and
    find the rendered shapes (foreground IoU >= 0.80, the issue's mIoU bar; per-class quality
    is tests/models' job, on 100 fresh images)."""
    from pycocotools import mask as mask_utils

    from core.imaging import load_input
    from core.postprocess import class_map
    from core.runtime import OnnxModel

    model = OnnxModel.load(Path(__file__).resolve().parents[2] / "models" / "shapes-segmenter" / "1" / "model.onnx",
                           "shapes-segmenter", "1", "cpu", 1)
    c = model.contract
    fg_inter = fg_union = 0
    for seed in range(6):
        sc = scene(3000 + seed, 256, 200)
        truth, data = sc.semantic_mask(), jpeg(sc.image)
        status, _, body = post(server.url + "/segment", {"image": ("s.jpg", data)})
        assert status == 200, body
        pred = np.zeros_like(truth)
        for cls in body["classes"]:
            m = mask_utils.decode({"size": cls["rle"]["size"], "counts": cls["rle"]["counts"].encode()}).astype(bool)
            assert m.shape == truth.shape and int(m.sum()) == cls["area"]
            pred[m] = cls["label_id"]
        _, arr, geo = load_input(data, c.input)
        expected = class_map(model.run(arr[None])[c.outputs.masks][0], c.outputs.kind, geo)
        np.testing.assert_array_equal(pred, expected)
        fg_inter += int(((pred > 0) & (truth > 0)).sum())
        fg_union += int(((pred > 0) | (truth > 0)).sum())
    assert fg_inter / fg_union >= 0.80, fg_inter / fg_union  # the mIoU bar


def test_segment_polygons_and_png_describe_the_rle_masks(server) -> None:
    """The three mask formats of one request describe the same masks: polygons rasterised
    back cover the RLE mask they came from, and the PNG holds the same class map."""
    import base64
    import io

    from pycocotools import mask as mask_utils

    data = jpeg(scene(3100, 256, 200).image)
    _, _, rle = post(server.url + "/segment", {"image": ("s.jpg", data)}, {"mask_format": "rle"})
    _, _, poly = post(server.url + "/segment", {"image": ("s.jpg", data)}, {"mask_format": "polygon"})
    _, _, png = post(server.url + "/segment", {"image": ("s.jpg", data)}, {"mask_format": "png"})
    assert rle["classes"] and [c["label_id"] for c in rle["classes"]] == [c["label_id"] for c in poly["classes"]]
    for r, p in zip(rle["classes"], poly["classes"]):
        truth = mask_utils.decode({"size": r["rle"]["size"], "counts": r["rle"]["counts"].encode()}).astype(bool)
        assert p["polygons"] and all(len(ring) >= 6 and len(ring) % 2 == 0 for ring in p["polygons"])
        drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p["polygons"], 200, 256))).astype(bool)
        overlap = iou(drawn, truth)
        assert overlap >= 0.85, (r["label"], overlap)
        assert p["area"] == r["area"] and p["bbox"] == r["bbox"]
    cmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["mask_png"]))))
    assert cmap.shape == (200, 256)
    for r in rle["classes"]:
        truth = mask_utils.decode({"size": r["rle"]["size"], "counts": r["rle"]["counts"].encode()}).astype(bool)
        assert np.array_equal(cmap == r["label_id"], truth)
    assert {int(v) for v in np.unique(cmap)} - {0} == {c["label_id"] for c in png["classes"]}


def test_score_threshold_filters_and_keeps_the_rest_unchanged(server) -> None:
    data = jpeg(scene(1002).image)
    _, _, all_ = post(server.url + "/detect", {"image": ("d.jpg", data)},
                      {"score_threshold": "0.0", "max_detections": "100"})
    _, _, high = post(server.url + "/detect", {"image": ("d.jpg", data)}, {"score_threshold": "0.5"})
    assert len(all_["detections"]) == 100 and all(d["score"] >= 0.5 for d in high["detections"])
    assert high["detections"] == [d for d in all_["detections"] if d["score"] >= 0.5]
    assert 0 < len(high["detections"]) < 100


def test_model_can_be_named_with_its_version(server) -> None:
    data = jpeg(scene(7).image)
    status, _, body = post(server.url + "/classify", {"image": ("g.jpg", data)}, {"model": "shapes-classifier:1"})
    assert status == 200 and body["model"] == {"name": "shapes-classifier", "version": "1"}
    _, _, default = post(server.url + "/classify", {"image": ("g.jpg", data)})
    assert default["labels"] == body["labels"]


@pytest.mark.parametrize("case", ["not_image", "truncated", "empty", "bomb", "unknown_model", "bad_version",
                                  "wrong_task", "top_k_zero", "top_k_text", "threshold", "mask_format", "no_image"])
def test_bad_input_gets_4xx_json_and_server_keeps_serving(server, case) -> None:
    good = jpeg(scene(5).image)
    endpoint, files, fields, status_want, type_want = {
        "not_image": ("classify", {"image": ("a.txt", b"this is text")}, {}, 400, "invalid_image"),
        "truncated": ("classify", {"image": ("t.jpg", good[: len(good) // 3])}, {}, 400, "invalid_image"),
        "empty": ("classify", {"image": ("e.jpg", b"")}, {}, 400, "invalid_image"),
        "bomb": ("detect", {"image": ("b.png", decompression_bomb_png(50000, 50000))}, {}, 413, "image_too_large"),
        "unknown_model": ("classify", {"image": ("g.jpg", good)}, {"model": "nope"}, 404, "unknown_model"),
        "bad_version": ("classify", {"image": ("g.jpg", good)}, {"model": "shapes-classifier:9"}, 404, "unknown_model"),
        "wrong_task": ("classify", {"image": ("g.jpg", good)}, {"model": "shapes-detector"}, 422, "invalid_parameter"),
        "top_k_zero": ("classify", {"image": ("g.jpg", good)}, {"top_k": "0"}, 422, "invalid_parameter"),
        "top_k_text": ("classify", {"image": ("g.jpg", good)}, {"top_k": "many"}, 422, "invalid_parameter"),
        "threshold": ("detect", {"image": ("g.jpg", good)}, {"score_threshold": "1.5"}, 422, "invalid_parameter"),
        "mask_format": ("segment", {"image": ("g.jpg", good)}, {"mask_format": "jpeg"}, 422, "invalid_parameter"),
        "no_image": ("detect", {}, {"top_k": "1"}, 422, "invalid_parameter"),
    }[case]
    status, headers, body = post(f"{server.url}/{endpoint}", files, fields)
    assert status == status_want, body
    assert headers.get("content-type", headers.get("Content-Type", "")).startswith("application/json")
    assert body["error"]["type"] == type_want and body["error"]["message"]
    _ok(server)


def test_oversized_upload_is_refused_before_the_body_is_read(server) -> None:
    """A 40 MiB Content-Length is answered 413 from the headers alone (no body sent)."""
    import json
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  f"Content-Length: {40 * 1024 * 1024}\r\n\r\n".encode())
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["type"] == "payload_too_large"
    _ok(server)


def test_upload_over_the_byte_limit_is_413(tmp_path: Path) -> None:
    """A body over CONVSERVE_MAX_BYTES is refused while it is read."""
    srv = start_server(Path(__file__).resolve().parents[2] / "models", tmp_path / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_MAX_BYTES": "100000"})
    try:
        big = jpeg(Image.effect_noise((800, 800), 80).convert("RGB"))
        assert len(big) > 100000
        status, _, body = post(srv.url + "/classify", {"image": ("big.jpg", big)})
        assert status == 413 and body["error"]["type"] == "payload_too_large"
        _ok(srv)
    finally:
        stop_server(srv.proc)


def test_large_phone_photo_is_served(server) -> None:
    img = Image.new("RGB", (4000, 3000), (40, 90, 160))
    status, _, body = post(server.url + "/classify", {"image": ("p.jpg", jpeg(img))})
    assert status == 200 and body["image"]["width"] == 4000 and body["image"]["height"] == 3000


def _histogram_counts(metrics: str, name: str, model: str) -> tuple[float, float]:
    le1 = total = 0.0
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket") and f'model="{model}"' in line and 'le="1.0"' in line:
            le1 += float(line.rsplit(" ", 1)[1])
        if line.startswith(f"{name}_count") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return le1, total


def test_concurrent_requests_are_batched(server) -> None:
    images = [jpeg(scene(100 + i, 200, 160).image) for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda d: post(server.url + "/classify", {"image": ("c.jpg", d)}), images))
    assert all(s == 200 for s, _, _ in results)
    assert max(b["timing"]["batch_size"] for _, _, b in results) > 1
    status, _, text = get(server.url + "/metrics")
    assert status == 200 and "convserve_inference_seconds" in text and "bentoml_service_request_total" in text
    ones, total = _histogram_counts(text, "convserve_batch_size", "shapes-classifier:1")
    assert total >= 32 / 16 and ones < total, (ones, total)


def test_broken_model_stops_start_up_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "repo" / "broken" / "1" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(RuntimeError) as exc:
        start_server(tmp_path / "repo", tmp_path / "serve.log", timeout=90)
    assert str(bad) in str(exc.value)


def test_explicit_cuda_without_gpu_fails_start_up(tmp_path: Path) -> None:

    try:
        srv = start_server(Path(__file__).resolve().parents[2] / "models", tmp_path / "serve.log",
                           env={"CONVSERVE_DEVICE": "cuda"}, timeout=90)
    except RuntimeError as exc:
        assert "CONVSERVE_DEVICE=cuda" in str(exc)
        return
    stop_server(srv.proc)
    pytest.skip("this machine has a usable CUDA device: cuda start-up succeeded")


def test_overload_is_an_explicit_503_with_retry_after(tmp_path: Path) -> None:
    """Room for one request and no admission wait under 24 concurrent requests: some are
    shed at once, none hang, and the next request is served."""
    srv = start_server(Path(__file__).resolve().parents[2] / "models", tmp_path / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_MAX_QUEUE": "1", "CONVSERVE_MAX_BATCH": "1",
                            "CONVSERVE_ADMISSION_WAIT_MS": "0"})
    try:
        data = jpeg(scene(9, 640, 480).image)
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda _: post(srv.url + "/segment", {"image": ("o.jpg", data)}, timeout=60),
                                    range(24)))
        shed = [(h, b) for s, h, b in results if s == 503]
        assert shed and len(shed) < 24, [s for s, _, _ in results]
        assert all(s in (200, 503) for s, _, _ in results)
        for headers, body in shed:
            assert body["error"]["type"] == "overloaded"
            assert (headers.get("retry-after") or headers.get("Retry-After")) == "1"
        _ok(srv)
    finally:
        stop_server(srv.proc)


def _shape_scene(seed: int, class_id: int, size: int = 256):
    rng = np.random.default_rng(seed)
    return render_scene(rng, size, size, 1, 0.22 * size, 0.3 * size, class_ids=[class_id])


def test_embeddings_put_two_crops_of_one_shape_nearer_than_another_shape(server) -> None:
    """/embed (the shipped classifier's penultimate features): two different crops around the
    same star are nearer each other than either is to a crop around a circle."""
    def crop(sc, margin: int, shift: int) -> bytes:
        x1, y1, x2, y2 = sc.instances[0].bbox_xyxy
        box = (max(0, x1 - margin + shift), max(0, y1 - margin), min(sc.image.width, x2 + margin + shift),
               min(sc.image.height, y2 + margin))
        return jpeg(sc.image.crop(tuple(int(v) for v in box)))

    def embed(data: bytes) -> np.ndarray:
        status, _, body = post(server.url + "/embed", {"image": ("c.jpg", data)})
        assert status == 200, body
        return np.array(body["embedding"])

    for seed in range(3):
        star, circle = _shape_scene(900 + seed, SHAPES.index("star")), _shape_scene(950 + seed, SHAPES.index("circle"))
        a, b, c = embed(crop(star, 6, 0)), embed(crop(star, 30, 12)), embed(crop(circle, 10, 0))
        assert a @ b > max(a @ c, b @ c), (seed, a @ b, a @ c, b @ c)


def test_class_activation_maps_light_up_the_shape(server) -> None:
    """cam=true: the best label's heatmap is mostly hotter on the shape than around it (85% of
    40 such scenes when measured; a 4x4 map over a 128 px input is coarse)."""
    import base64
    import io

    hotter, inside, outside = 0, [], []
    for seed in range(20):
        sc = _shape_scene(970 + seed, seed % len(SHAPES), 200)
        status, _, body = post(server.url + "/classify", {"image": ("s.jpg", jpeg(sc.image))},
                               {"cam": "true", "top_k": "1"})
        assert status == 200, body
        (best,) = body["labels"]
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(best["heatmap_png"])))).astype(float)
        assert heat.shape == (200, 200) and heat.max() == 255
        mask = sc.instances[0].mask
        hotter += heat[mask].mean() > heat[~mask].mean()
        inside.append(heat[mask].mean())
        outside.append(heat[~mask].mean())
    assert hotter >= 14 and np.mean(inside) > 1.5 * np.mean(outside), (hotter, np.mean(inside), np.mean(outside))
