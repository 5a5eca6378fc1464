"""Placement in the real service: a lone image on an idle worker runs on every core, batches on
one thread a run, and a worker given one core (taskset) keeps to one."""

from collections.abc import Iterator

import pytest

from tests.support.http import MULTIPART, get, multipart_body, post, request
from tests.support.images import jpeg, scene
from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def both_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shipped models with a second session for lone images (CONVSERVE_PLACEMENT=both)."""
    log = tmp_path_factory.mktemp("placement") / "serve.log"
    srv = start_server(SHIPPED_MODELS, log, env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_PLACEMENT": "both",
                                                 "CONVSERVE_ORT_THREADS": "2", "CONVSERVE_INFERENCE_THREADS": "2"})
    yield srv
    stop_server(srv.proc)


def test_a_lone_image_gets_every_core_and_batched_ones_one_each(both_server: Server) -> None:
    image = jpeg(scene(1, 320, 240).image)
    status, _, lone = post(both_server.url + "/classify", {"image": ("a.jpg", image)})
    assert status == 200, lone
    assert lone["timing"]["threads"] == 2 and lone["timing"]["batch_size"] == 1
    # Two images of one request go through the batcher: runs on one thread each.
    body = multipart_body([("image", f"{i}.jpg", image) for i in range(2)])
    status, _, pair = request(both_server.url, "POST", "/classify", body, MULTIPART)
    assert status == 200, pair
    assert pair["timing"]["threads"] == 1 and pair["timing"]["batch_size"] in (1, 2)  # two free runs: 1 each
    # Same pixels, same graph and weights, either session: the same labels.
    assert [r["labels"][0]["label"] for r in pair["results"]] == [lone["labels"][0]["label"]] * 2
    assert abs(pair["results"][0]["labels"][0]["score"] - lone["labels"][0]["score"]) < 1e-4


def test_models_say_how_they_are_placed_and_their_batch_target(both_server: Server) -> None:
    status, _, body = get(both_server.url + "/models")
    assert status == 200
    for model in body["models"]:
        assert model["placement"] == {"mode": "both", "batch_threads": 1, "lone_threads": 2, "runs": 2,
                                      "reason": "CONVSERVE_PLACEMENT"}
        batch = model["batch"]
        assert batch["target_ms"] >= 25 and 1 <= batch["limit_now"] <= batch["max_batch"]


def test_one_core_means_one_thread_and_one_run(tmp_path) -> None:
    """Started under taskset on one core: the defaults follow (service.settings.machine_defaults)."""
    srv = start_server(SHIPPED_MODELS, tmp_path / "serve.log", env={"CONVSERVE_DEVICE": "cpu"},
                       prefix=("taskset", "-c", "0"))
    try:
        status, _, body = get(srv.url + "/models")
        assert status == 200
        for model in body["models"]:
            assert model["placement"]["mode"] == "narrow" and model["placement"]["runs"] == 1, model["placement"]
            assert model["placement"]["reason"] == "one core per worker"
        status, _, answer = post(srv.url + "/classify", {"image": ("a.jpg", jpeg(scene(2, 160, 120).image))})
        assert status == 200 and answer["timing"]["threads"] == 1
        assert "1 core(s) for this process" in srv.log_text()
    finally:
        stop_server(srv.proc)
