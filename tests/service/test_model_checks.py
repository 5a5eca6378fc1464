"""A model whose contract disagrees with its graph (fewer or more labels than classes) or is
too large (20,000 labels) is refused when it is loaded, never served with 500s; what clients
are told names the file relative to the model root, in convserve's words, and ONNX Runtime's
own text stays in the server log."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.http import get, post, request
from tests.support.images import jpeg, scene
from tests.support.models import with_contract
from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server

ADMIN = "admin-" + "m" * 30
CLASSIFIER = SHIPPED_MODELS / "shapes-classifier" / "1" / "model.onnx"
SEGMENTER = SHIPPED_MODELS / "shapes-segmenter" / "1" / "model.onnx"
LOG_ONLY = "(the server log has details)"


# name -> (how its file is made from the repository root, the reason clients are told)
BAD: dict[str, tuple[Callable[[Path], object], str]] = {
    "few-labels": (lambda root: with_contract(CLASSIFIER, root / "few-labels" / "1" / "model.onnx",
                                              lambda d: d.update(labels=d["labels"][:4])),
                   "invalid model: labels: the contract lists 4 labels, but the graph's scores output 'logits' "
                   "has 5 classes"),
    "many-labels": (lambda root: with_contract(CLASSIFIER, root / "many-labels" / "1" / "model.onnx",
                                               lambda d: d.update(labels=[f"class-{i}" for i in range(20_000)])),
                    "invalid model: labels: 20000 labels, more than the 10000 a model may have"),
    "seg-few-labels": (lambda root: with_contract(SEGMENTER, root / "seg-few-labels" / "1" / "model.onnx",
                                                  lambda d: d.update(labels=d["labels"][:5])),
                       "invalid model: labels: the contract lists 5 labels, but a run's masks output 'masks' "
                       "has 6 classes"),
    "not-onnx": (lambda root: _write(root / "not-onnx" / "1" / "model.onnx", b"this is not an onnx file"),
                 f"invalid model: ONNX Runtime could not load the graph {LOG_ONLY}"),
}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def checked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A good classifier, served; the bad models are put beside it once it runs."""
    root = tmp_path_factory.mktemp("checks") / "repo"
    (root / "good" / "1").mkdir(parents=True)
    shutil.copy(CLASSIFIER, root / "good" / "1" / "model.onnx")
    srv = start_server(root, root.parent / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_POLL_S": "0", "CONVSERVE_ADMIN_KEYS": ADMIN})
    srv.root = root  # type: ignore[attr-defined]
    yield srv
    stop_server(srv.proc)


@pytest.mark.slow
def test_bad_models_are_refused_with_our_reasons_and_the_good_one_serves(checked_server: Server) -> None:
    srv, root = checked_server, checked_server.root  # type: ignore[attr-defined]
    for make, _ in BAD.values():
        make(root)
    (root / "empty" / "1").mkdir(parents=True)  # a version folder without its file
    status, _, report = request(srv.url, "POST", "/admin/reload", b"", {"Authorization": f"Bearer {ADMIN}"})
    assert status == 200 and report["added"] == [], report
    want = {f"{name}/1/model.onnx": reason for name, (_, reason) in BAD.items()}
    assert report["refused"] == want
    status, _, listed = get(srv.url + "/models")
    assert status == 200 and [m["name"] for m in listed["models"]] == ["good"]
    missing = "missing (every <name>/<version>/ folder holds a model.onnx)"
    assert {e["path"]: e["error"] for e in listed["errors"]} == {**want, "empty/1/model.onnx": missing}
    assert len(json.dumps(listed)) < 20_000  # the 20,000 labels are not listed
    status, _, index = request(srv.url, "POST", "/v2/repository/index")
    states = {(e["name"], e["version"]): (e["state"], e["reason"]) for e in index}
    assert states[("good", "1")] == ("READY", "") and states[("empty", "1")] == ("UNAVAILABLE", missing)
    assert all(states[(name, "1")] == ("UNAVAILABLE", reason) for name, (_, reason) in BAD.items()), states
    for answer in (report, listed, index):  # no server path, no ONNX Runtime internals
        text = json.dumps(answer)
        assert str(root) not in text and "ONNXRuntimeError" not in text and "Protobuf" not in text
    log = srv.log_text()  # the operator gets both
    assert (f"refused not-onnx:1: {root / 'not-onnx' / '1' / 'model.onnx'}: invalid model: "
            "ONNX Runtime cannot load it") in log
    assert "INVALID_PROTOBUF" in log

    status, _, body = post(srv.url + "/classify", {"image": ("a.jpg", jpeg(scene(700).image))}, {"model": "good"})
    assert status == 200 and body["model"]["name"] == "good"
    status, _, body = post(srv.url + "/classify", {"image": ("a.jpg", jpeg(scene(700).image))}, {"model": "few-labels"})
    assert status == 404 and body["error"]["type"] == "unknown_model"


def test_a_model_whose_labels_disagree_with_its_graph_stops_start_up(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up check (service.check, in-process here) stops on it with one line for the
    operator: the full path, and the reason."""
    from service.repository import Refused, check_repository
    from service.settings import Settings

    path = BAD["few-labels"][0](tmp_path)
    monkeypatch.setenv("CONVSERVE_MODEL_ROOT", str(tmp_path))
    monkeypatch.setenv("CONVSERVE_DEVICE", "cpu")
    with pytest.raises(Refused) as exc:
        check_repository(Settings.from_env())
    assert str(exc.value) == f"{path}: {BAD['few-labels'][1]}"
