"""The HTTP endpoints (service.endpoints): one per task (/embed the embedding task's), their options, which
models they serve, and their results."""

import numpy as np
import pytest

from core.errors import InvalidOption
from core.geometry import Geometry
from core.tasks import TASKS
from service.endpoints import ENDPOINTS, TASK_ENDPOINTS
from tests.support.models import contract

BY_ENDPOINT = {e.name: e for e in TASK_ENDPOINTS.values()}


def test_every_task_has_an_endpoint_a_metric_and_options() -> None:
    assert set(BY_ENDPOINT) == {"classify", "detect", "segment", "instances", "keypoints", "embed"}
    for name, task in TASKS.items():
        endpoint = TASK_ENDPOINTS[name]
        assert endpoint.task is task and task.name == name
        assert endpoint.options[0].name == "model"
        assert task.default_resize in ("stretch", "letterbox")


@pytest.mark.parametrize("endpoint,raw,want", [
    ("classify", {}, {"model": "", "top_k": 5, "cam": False}),
    ("classify", {"top_k": " 3 ", "model": "m:2", "cam": "True"}, {"model": "m:2", "top_k": 3, "cam": True}),
    ("classify", {"cam": "0"}, {"model": "", "top_k": 5, "cam": False}),
    ("detect", {"score_threshold": "0", "max_detections": "1000"},
     {"model": "", "score_threshold": 0.0, "max_detections": 1000}),
    ("segment", {"mask_format": "polygon"}, {"model": "", "mask_format": "polygon"}),
    ("keypoints", {"score_threshold": "0.5"}, {"model": "", "score_threshold": 0.5, "max_detections": 100}),
    ("instances", {"mask_format": "png"}, {"model": "", "score_threshold": 0.3, "max_detections": 100,
                                           "mask_format": "png"}),
])
def test_options_parse(endpoint, raw, want) -> None:
    assert BY_ENDPOINT[endpoint].parse_options(raw) == want


@pytest.mark.parametrize("endpoint,raw,message", [
    ("classify", {"top_k": "0"}, "top_k: must be >= 1"),
    ("classify", {"top_k": "1001"}, "top_k: must be <= 1000"),
    ("classify", {"top_k": "2.5"}, "top_k: expected an integer"),
    ("classify", {"top_k": ""}, "top_k: expected an integer"),
    ("classify", {"cam": "maybe"}, "cam: expected true or false"),
    ("detect", {"score_threshold": "nan"}, "score_threshold: expected a finite number"),
    ("detect", {"score_threshold": "1.5"}, "score_threshold: must be <= 1.0"),
    ("segment", {"mask_format": "jpeg"}, "mask_format: must be one of rle, polygon, png"),
    ("segment", {"top_k": "3"}, "top_k: unknown option for /segment"),
])
def test_bad_options_are_named(endpoint, raw, message) -> None:
    with pytest.raises(InvalidOption, match=f"^{message}") as exc:
        BY_ENDPOINT[endpoint].parse_options(raw)
    assert exc.value.field == message.split(":")[0]


def test_embed_is_served_by_classifiers_with_an_embedding_only() -> None:
    embed = ENDPOINTS["embed"]
    plain = contract("classification", {"kind": "logits", "scores": "s"})
    with_embedding = contract("classification", {"kind": "logits", "scores": "s", "embedding": "e"})
    assert not embed.serves(plain) and embed.serves(with_embedding) and ENDPOINTS["classify"].serves(plain)
    result = embed.result({"s": np.zeros(3), "e": np.array([3.0, 0.0, 4.0])}, Geometry(8, 8, 1, 1, 8, 8),
                          with_embedding, {})
    assert result == {"embedding": [0.6, 0.0, 0.8], "dimensions": 3}


def test_cam_is_refused_for_a_model_without_it_and_drawn_at_original_size() -> None:
    classify = ENDPOINTS["classify"]
    plain = contract("classification", {"kind": "logits", "scores": "s"})
    with pytest.raises(InvalidOption, match="^cam: this model carries no class activation maps"):
        classify.check_request(plain, {"cam": True})
    classify.check_request(plain, {"cam": False})
    c = contract("classification", {"kind": "logits", "scores": "s", "cam": "c"})
    cam = np.zeros((3, 2, 2), np.float32)
    cam[2, 0, 1] = 4.0  # class b is hot in the top-right cell only
    geo = Geometry(40, 20, 8 / 40, 8 / 20, 8, 8)  # a 40x20 upload stretched to the 8x8 input
    (best, _) = classify.result({"s": np.array([0.0, 1.0, 3.0]), "c": cam}, geo, c, {"top_k": 2, "cam": True})["labels"]
    import base64
    import io

    from PIL import Image

    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(best["heatmap_png"]))))
    assert best["label"] == "b" and heat.shape == (20, 40) and heat.max() == 255
    assert heat[:, 30:].mean() > 3 * heat[:, :10].mean()  # hot on the right, as the grid says
