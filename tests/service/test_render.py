"""Annotated images from the task endpoints (render=png|jpeg, or an Accept header): the JSON
answer drawn on the original image, at its size; bad render requests are 422."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.render import colour
from tests.support.http import post, request
from tests.support.images import jpeg, scene


def _image(body: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(body))
    img.load()
    return img


def test_detections_are_drawn_where_the_json_says(server) -> None:
    data = jpeg(scene(400, 320, 240).image)
    _, _, answer = post(server.url + "/detect", {"image": ("a.jpg", data)})
    status, headers, body = request(server.url, "POST", "/detect?render=png", data, {"Content-Type": "image/jpeg"})
    assert status == 200 and headers["content-type"] == "image/png"
    drawn = np.asarray(_image(body).convert("RGB")).astype(int)
    assert drawn.shape == (240, 320, 3)
    plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert answer["detections"]
    best = answer["detections"][0]  # drawn last, so no other box covers its outline
    x1, y1, x2, y2 = (int(round(v)) for v in best["box"])
    left = drawn[max(y1, 0) + 4:min(y2, 239) - 4, min(max(x1, 0), 319)]  # its left edge, in its label's colour
    assert (np.abs(left - np.array(colour(best["label_id"]))).sum(axis=1) < 40).mean() > 0.8
    outside = np.ones((240, 320), bool)
    for d in answer["detections"]:
        x1, y1, x2, y2 = d["box"]
        outside[max(0, int(y1) - 30):int(y2) + 4, max(0, int(x1) - 4):int(x2) + 60] = False
    assert np.abs(drawn[outside] - plain[outside]).max() <= 1  # nothing drawn away from the boxes


def test_masks_are_blended_and_accept_picks_jpeg(server) -> None:
    data = jpeg(scene(401, 300, 220).image)
    _, _, answer = post(server.url + "/segment", {"image": ("a.jpg", data)}, {"mask_format": "png"})
    import base64

    cmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))))
    status, headers, body = request(server.url, "POST", "/segment", data,
                                    {"Content-Type": "image/jpeg", "Accept": "image/jpeg"})
    assert status == 200 and headers["content-type"] == "image/jpeg"
    drawn = np.asarray(_image(body).convert("RGB")).astype(float)
    plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
    assert drawn.shape == plain.shape
    diff = np.abs(drawn - plain).sum(axis=2)
    fg = cmap > 0
    fg[:40] = False  # the legend
    assert fg.sum() > 500 and diff[fg].mean() > 4 * diff[~fg][40:].mean() + 5


def test_classification_with_cam_is_drawn(server) -> None:
    data = jpeg(scene(402, 200, 160, shapes=1).image)
    status, headers, plain = request(server.url, "POST", "/classify?render=png", data, {"Content-Type": "image/jpeg"})
    assert status == 200 and _image(plain).size == (200, 160)
    status, _, heat = request(server.url, "POST", "/classify?render=png&cam=true", data, {"Content-Type": "image/jpeg"})
    assert status == 200
    a, b = (np.asarray(_image(x).convert("RGB")).astype(int) for x in (plain, heat))
    assert np.abs(a - b)[60:].mean() > 10  # the heatmap is blended over the whole image


@pytest.mark.parametrize("query,message", [("render=gif", "render: must be png, jpeg, true or false"),
                                           ("render=png&top_k=0", "top_k: must be >= 1")])
def test_bad_render_requests_are_422(server, query, message) -> None:
    status, _, body = request(server.url, "POST", f"/classify?{query}", jpeg(scene(403).image),
                              {"Content-Type": "image/jpeg"})
    assert status == 422 and body["error"]["message"].startswith(message)


def test_render_answers_one_image(server) -> None:
    from tests.support.http import MULTIPART, multipart_body

    body = multipart_body([("image", "a.jpg", jpeg(scene(404).image)), ("image", "b.jpg", jpeg(scene(405).image)),
                           ("render", None, b"png")])
    status, _, answer = request(server.url, "POST", "/detect", body, MULTIPART)
    assert status == 422 and "one image; this request has 2" in answer["error"]["message"]


def test_a_very_large_image_is_drawn_reduced(server) -> None:
    """Over service.render.MAX_PIXELS (16 MP), the canvas is reduced by a whole factor: a
    24 MP upload comes back at half its size, the boxes where the JSON says at that scale."""
    big = scene(406, 600, 400).image.resize((6000, 4000))
    data = jpeg(big)
    _, _, answer = post(server.url + "/detect", {"image": ("a.jpg", data)})
    status, headers, body = request(server.url, "POST", "/detect?render=png", data, {"Content-Type": "image/jpeg"})
    assert status == 200 and _image(body).size == (3000, 2000)
    assert answer["image"] == {"width": 6000, "height": 4000, "format": "JPEG"}
