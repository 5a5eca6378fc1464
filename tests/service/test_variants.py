"""An int8 variant beside its fp32 model in one repository: both served, the contract's
precision listed, the same answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export.quantize import quantize
from tests.support.http import get, post
from tests.support.servers import ROOT, start_server, stop_server
from training.synthetic import write_classification

pytestmark = pytest.mark.slow  # quantizes and starts a server


def test_int8_version_is_served_beside_fp32(tiny_data: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "models" / "shapes-classifier", repo / "shapes-classifier")
    fresh = tmp_path / "fresh"
    write_classification(fresh, 60, seed=7)
    quantize(repo / "shapes-classifier" / "1" / "model.onnx", repo / "shapes-classifier" / "2" / "model.onnx",
             tiny_data / "cls" / "train", fresh, images=20)
    srv = start_server(repo, tmp_path / "serve.log", env={"CONVSERVE_DEVICE": "cpu"})
    try:
        models = {m["version"]: m for m in get(srv.url + "/models")[2]["models"]}
        assert models["1"]["precision"] == "fp32" and models["2"]["precision"] == "int8"
        assert models["2"]["default_version"] and not models["1"]["default_version"]
        images = sorted(fresh.rglob("*.jpg"))[:12]
        right = 0
        for path in images:
            answers = {}
            for version in ("1", "2"):
                status, _, body = post(srv.url + "/classify", {"image": ("a.jpg", path.read_bytes())},
                                       {"model": f"shapes-classifier:{version}", "top_k": "1"})
                assert status == 200 and body["model"]["version"] == version, body
                answers[version] = body["labels"][0]["label"]
            assert answers["1"] == answers["2"], (path, answers)
            right += answers["2"] == path.parent.name
        assert right >= 10, right  # the fp32 model's fresh-set top-1 is 0.988
    finally:
        stop_server(srv.proc)
