"""Real answers of every route against the response models the OpenAPI document publishes
(service.schemas): each answer validates, and validating loses nothing (no field the model
does not declare, no field of the wrong type)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pydantic import BaseModel

from service import schemas
from tests.support.http import MULTIPART, get, multipart_body, post, request
from tests.support.images import jpeg, scene


def _conforms(model: type[BaseModel] | Any, answer: Any) -> None:
    """``answer`` validates against ``model`` and dumping the validated model gives it back."""
    from pydantic import TypeAdapter

    adapter = TypeAdapter(model)
    value = adapter.validate_python(answer)
    dumped = adapter.dump_python(value, exclude_unset=True, mode="json")
    assert json.loads(json.dumps(dumped)) == json.loads(json.dumps(answer))


IMAGES = [jpeg(scene(seed).image) for seed in (31, 32)]
OPTIONS = {"classify": {"cam": "true", "top_k": "2"}, "detect": {}, "segment": {"mask_format": "polygon"}, "embed": {},
           "instances": {"mask_format": "png"}, "keypoints": {}}


@pytest.mark.parametrize("endpoint", sorted(schemas.RESPONSES))
def test_every_endpoint_answers_as_its_response_models_say(server, endpoint: str) -> None:
    single, batch = schemas.RESPONSES[endpoint]
    status, _, one = post(f"{server.url}/{endpoint}", {"image": ("a.jpg", IMAGES[0])}, OPTIONS[endpoint])
    assert status == 200, one
    _conforms(single, one)
    parts = [("image", "a.jpg", IMAGES[0]), ("image", "b.jpg", IMAGES[1])]
    parts += [(k, None, v.encode()) for k, v in OPTIONS[endpoint].items()]
    status, _, two = request(server.url, "POST", f"/{endpoint}", multipart_body(parts), MULTIPART)
    assert status == 200, two
    _conforms(batch, two)


@pytest.mark.parametrize("fmt", ["rle", "png"])
def test_segment_mask_formats_conform(server, fmt: str) -> None:
    status, _, answer = post(f"{server.url}/segment", {"image": ("a.jpg", IMAGES[0])}, {"mask_format": fmt})
    assert status == 200
    _conforms(schemas.SegmentResponse, answer)


@pytest.mark.parametrize("fmt", ["rle", "polygon"])
def test_instance_mask_formats_conform(server, fmt: str) -> None:
    status, _, answer = post(f"{server.url}/instances", {"image": ("a.jpg", IMAGES[0])}, {"mask_format": fmt})
    assert status == 200 and answer["detections"]
    _conforms(schemas.InstancesResponse, answer)


def test_models_errors_and_v2_answers_conform(server) -> None:
    status, _, models = get(server.url + "/models")
    assert status == 200
    _conforms(schemas.ModelList, models)
    status, _, error = post(f"{server.url}/classify", {"image": ("a.jpg", b"not an image")})
    assert status == 400
    _conforms(schemas.ErrorBody, error)
    status, _, meta = get(server.url + "/v2")
    _conforms(schemas.V2ServerMetadata, meta)
    for m in models["models"]:
        status, _, meta = get(f"{server.url}/v2/models/{m['name']}")
        assert status == 200
        _conforms(schemas.V2ModelMetadata, meta)
        doc = {"inputs": [{"name": meta["inputs"][0]["name"], "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(IMAGES[0]).decode()]}]}
        status, _, answer = request(server.url, "POST", f"/v2/models/{m['name']}/infer", json.dumps(doc).encode(),
                                    {"Content-Type": "application/json"})
        assert status == 200, answer
        _conforms(schemas.V2InferResponse, answer)
    status, _, index = request(server.url, "POST", "/v2/repository/index", b"")
    assert status == 200
    _conforms(list[schemas.V2RepositoryEntry], index)
    status, _, v2_error = get(server.url + "/v2/models/no-such-model")
    assert status == 404
    _conforms(schemas.V2Error, v2_error)
