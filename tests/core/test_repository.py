"""core.repository: the one spelling of the layout, and publish (contract in, one rename)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from core.contract import ModelContract
from core.errors import ContractError
from core.onnx_contract import read_contract
from core.repository import discover, model_path, parse_model_path, publish

LABELS = ["a", "b", "c"]


def _graph() -> onnx.ModelProto:
    """uint8 [N, 8, 8, 3] -> mean over the pixels -> [N, 3] "logits" (one per channel)."""
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["logits"], axes=[1, 2], keepdims=0)]
    images = helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 8, 8, 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(nodes, "tiny", [images], [logits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _contract(input_name: str = "images", **provenance: object) -> ModelContract:
    return ModelContract.from_dict({"task": "classification", "labels": LABELS,
                                    "input": {"name": input_name, "height": 8, "width": 8},
                                    "outputs": {"kind": "logits", "scores": "logits"},
                                    "provenance": provenance})


def test_model_path_and_its_inverse(tmp_path: Path) -> None:
    path = model_path(tmp_path, "m", "7")
    assert path == tmp_path / "m" / "7" / "model.onnx"
    assert parse_model_path(path) == (tmp_path, "m", "7")


def test_publish_writes_the_contract_and_the_repository_lists_it(tmp_path: Path) -> None:
    out = publish(_graph(), _contract(run=1), tmp_path, "tiny", "1")
    assert out == model_path(tmp_path, "tiny", "1")
    assert read_contract(out) == _contract(run=1)
    assert [(e.name, e.version, e.path) for e in discover(tmp_path)] == [("tiny", "1", out)]
    publish(_graph(), _contract(run=2), tmp_path, "tiny", "1")  # replaces the version in place
    assert read_contract(out).provenance == {"run": 2}
    assert os.listdir(out.parent) == ["model.onnx"]  # no staged file left behind


def test_publish_writes_nothing_when_the_contract_or_the_check_refuses(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="input.name"):
        publish(_graph(), _contract(input_name="pixels"), tmp_path, "tiny", "1")
    assert not model_path(tmp_path, "tiny", "1").exists()

    def refuse(staged: Path) -> None:
        assert staged.parent == model_path(tmp_path, "tiny", "1").parent and staged.name.startswith(".")
        assert read_contract(staged) == _contract()  # the check sees the finished file
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        publish(_graph(), _contract(), tmp_path, "tiny", "1", check=refuse)
    assert os.listdir(model_path(tmp_path, "tiny", "1").parent) == []
