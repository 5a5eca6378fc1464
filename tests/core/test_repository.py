"""core.repository: the one spelling of the layout, and publish (contract in, one rename)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from core.contract import ModelContract
from core.errors import ContractError, RepositoryError
from core.onnx_contract import read_contract
from core.repository import discover, model_path, parse_model_path, publish, scan

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


# --- the folders of one model that KServe's storage initializer lays out at /mnt/models ---------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"onnx")  # scan looks at names, never at the bytes
    return path


def _listed(root: Path, name: str | None = None) -> list[tuple[str, str, Path]]:
    return [(e.name, e.version, e.path) for e in discover(root, name)]


def test_a_repository_of_several_models_is_read_as_before(tmp_path: Path) -> None:
    a1, a2, b = (_touch(model_path(tmp_path, n, v)) for n, v in (("a", "1"), ("a", "2"), ("b", "x")))
    _touch(tmp_path / "a" / ".staging" / "model.onnx")
    (tmp_path / "notes.txt").write_text("not a model")
    assert _listed(tmp_path) == [("a", "1", a1), ("a", "2", a2), ("b", "x", b)]
    (tmp_path / "c" / "1").mkdir(parents=True)
    found, problems = scan(tmp_path)
    assert len(found) == 3 and problems == [(model_path(tmp_path, "c", "1"), problems[0][1])]
    assert "missing" in problems[0][1]


def test_one_onnx_file_at_the_top_is_one_model_version_1(tmp_path: Path) -> None:
    # gs://bucket/path/model.onnx -> /mnt/models/model.onnx (kserve_storage: a single object keeps its basename)
    root = tmp_path / "models"
    f = _touch(root / "model.onnx")
    (root / "README.md").parent.mkdir(exist_ok=True)
    (root / "README.md").write_text("files beside it are ignored")
    (root / "assets").mkdir()
    assert _listed(root) == [("models", "1", f)]  # no name given: the folder's
    assert _listed(root, "mymodel") == [("mymodel", "1", f)]  # CONVSERVE_MODEL_NAME: KServe's {{.Name}}


def test_a_file_of_another_name_is_named_by_its_stem(tmp_path: Path) -> None:
    f = _touch(tmp_path / "resnet18.onnx")
    assert _listed(tmp_path) == [("resnet18", "1", f)]
    assert _listed(f) == [("resnet18", "1", f)]  # CONVSERVE_MODEL_ROOT may be the file itself
    assert _listed(f, "r") == [("r", "1", f)]
    _touch(tmp_path / ".resnet18.onnx.tmp")  # hidden files are never models
    _touch(tmp_path / ".next.onnx")
    assert _listed(tmp_path) == [("resnet18", "1", f)]


def test_version_folders_of_one_model(tmp_path: Path) -> None:
    # Triton's folder of one model, as a directory storageUri or a pvc:// subPath puts it at /mnt/models
    root = tmp_path / "shapes-classifier"
    v1, v10, v2 = (_touch(root / v / "model.onnx") for v in ("1", "10", "2"))
    (root / "config.pbtxt").write_text("name: 'shapes-classifier'")
    _touch(root / ".staging" / "model.onnx")
    assert _listed(root) == [("shapes-classifier", "1", v1), ("shapes-classifier", "2", v2),
                             ("shapes-classifier", "10", v10)]
    assert [e.ref for e in discover(root, "mymodel")] == ["mymodel:1", "mymodel:2", "mymodel:10"]
    (root / "3").mkdir()  # a version folder without its model is a problem, as in a repository
    found, problems = scan(root)
    assert len(found) == 3 and problems == [(root / "3" / "model.onnx", problems[0][1])]
    with pytest.raises(RepositoryError, match="3/model.onnx: missing"):
        discover(root)


@pytest.mark.parametrize("layout, message", [
    (["a.onnx", "b.onnx"], "holds 2 .onnx files at its top"),
    (["model.onnx", "m/1/model.onnx"], "holds model.onnx at its top and model folders"),
    (["model.onnx", "1/model.onnx"], "holds model.onnx at its top and model folders"),
    (["1/model.onnx", "m/1/model.onnx"], r"holds version folders \(1/model.onnx\) beside model folders \(m\)"),
])
def test_a_folder_that_mixes_layouts_is_refused(tmp_path: Path, layout: list[str], message: str) -> None:
    for rel in layout:
        _touch(tmp_path / rel)
    with pytest.raises(RepositoryError, match=message):
        scan(tmp_path)


def test_a_model_file_outside_a_version_folder_is_a_problem_in_a_repository(tmp_path: Path) -> None:
    good = _touch(model_path(tmp_path, "a", "1"))
    stray = _touch(tmp_path / "b" / "model.onnx")  # a model folder given without its version folder
    found, problems = scan(tmp_path)
    assert [e.path for e in found] == [good]
    assert problems == [(stray, "not in a version folder (lay it out as b/1/model.onnx)")]
    with pytest.raises(RepositoryError, match="b/model.onnx: not in a version folder"):
        discover(tmp_path)


def test_an_empty_or_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="holds no <name>/<version>/model.onnx"):
        discover(tmp_path)
    with pytest.raises(RepositoryError, match="does not exist"):
        scan(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RepositoryError, match="does not exist or is not a directory"):
        scan(tmp_path / "notes.txt")
