import json

import pytest

from core.contract import ModelContract, check_io
from core.errors import ContractError


def _doc(**over):
    doc = {"task": "classification", "labels": ["a", "b"],
           "input": {"name": "images", "height": 32, "width": 32},
           "outputs": {"kind": "logits", "scores": "logits"}}
    doc.update(over)
    return doc


def _input(**over):
    return {"name": "images", "height": 32, "width": 32, **over}


def test_round_trip() -> None:
    c = ModelContract.from_dict(_doc(provenance={"metrics": {"top1": 0.5}}))
    assert ModelContract.from_json(c.to_json()) == c
    assert c.with_provenance(parity={"images": 4}).provenance == {"metrics": {"top1": 0.5}, "parity": {"images": 4}}


@pytest.mark.parametrize("over,message", [
    # wrong types: every one names its field
    ({"input": _input(pad_value="x")}, "input.pad_value: expected an integer, got a string 'x'"),
    ({"input": _input(height=32.0)}, "input.height: expected an integer, got a number 32.0"),
    ({"input": _input(width=True)}, "input.width: expected an integer, got a boolean True"),
    ({"input": _input(normalized_in_graph="yes")}, "input.normalized_in_graph: expected a boolean"),
    ({"batch": {"dynamic": False, "size": "4"}}, "batch.size: expected an integer, got a string '4'"),
    ({"batch": {"dynamic": "false", "size": 4}}, "batch.dynamic: expected a boolean"),
    ({"labels": "ab"}, "labels: expected a list, got a string"),
    ({"labels": ["a", 3]}, r"labels\[1\]: expected a string, got an integer 3"),
    ({"outputs": {"kind": "logits", "scores": 7}}, "outputs.scores: expected a string"),
    ({"outputs": {"kind": "logits", "scores": "x", "max_detections": "100"}},
     "outputs.max_detections: expected an integer"),
    ({"provenance": []}, "provenance: expected an object, got a list"),
    ({"schema_version": "1"}, "schema_version: expected an integer"),
    ({"task": None}, "task: expected a string, got null"),
    ({"input": "images"}, "input: expected an object, got a string"),
    # structure
    ({"input": _input(bogus=1)}, "input.bogus: unknown field"),
    ({"input": {"name": "images", "height": 32}}, "input.width: required field missing"),
    ({"color": "RGB"}, "color: unknown field"),
    # values
    ({"task": "pose"}, "task: must be one of"),
    ({"schema_version": 2}, "schema_version: unsupported version 2"),
    ({"labels": []}, "labels: must list at least one class name"),
    ({"labels": ["a", ""]}, r"labels\[1\]: empty class name"),
    ({"labels": ["a", "b", "a"]}, r"labels\[2\]: duplicate class name 'a'"),
    ({"input": _input(dtype="float32")}, "input.dtype: must be 'uint8'"),
    ({"input": _input(layout="NCHW")}, "input.layout: must be 'NHWC'"),
    ({"input": _input(channels=2)}, r"input.channels: must be 3 \(RGB\) or 1 \(greyscale\), got 2"),
    ({"input": _input(channels=1)}, "input.color: must be 'L' for 1 channel"),
    ({"input": _input(channels=3, color="L")}, "input.color: must be 'RGB' for 3 channel"),
    ({"task": "detection", "outputs": {"kind": "boxes", "boxes": "b", "scores": "s", "labels": "l", "cam": "c"}},
     "outputs.cam: not an output of a detection model"),
    ({"input": _input(height=0)}, r"input.height: must be in 1..16384, got 0"),
    ({"input": _input(resize="crop")}, "input.resize: must be one of"),
    ({"input": _input(pad_value=300)}, r"input.pad_value: must be in 0..255, got 300"),
    ({"input": _input(normalized_in_graph=False)}, "input.normalized_in_graph: false is not supported"),
    ({"outputs": {"kind": "logits"}}, "outputs.scores: required for classification"),
    ({"outputs": {"kind": "boxes", "scores": "x"}}, "outputs.kind: a classification model's must be one of"),
    ({"outputs": {"kind": "logits", "scores": "x", "masks": "m"}},
     "outputs.masks: not an output of a classification model"),
    ({"batch": {"dynamic": False}}, "batch.size: a fixed batch"),
    ({"batch": {"dynamic": False, "size": 0}}, "batch.size: a fixed batch"),
    ({"batch": {"dynamic": True, "size": 4}}, "batch.size: must be null when batch.dynamic is true"),
    ({"precision": "fp8"}, r"precision: must be one of \['fp32', 'int8'\], got 'fp8'"),
    ({"precision": 8}, "precision: expected a string"),
])
def test_every_wrong_field_is_named(over, message) -> None:
    with pytest.raises(ContractError, match=f"^{message}"):
        ModelContract.from_dict(_doc(**over))


@pytest.mark.parametrize("task,outputs", [
    ("detection", {"kind": "boxes", "boxes": "b", "scores": "s"}),
    ("segmentation", {"kind": "class_map", "masks": "m", "scores": "s"}),
    ("segmentation", {"kind": "logits", "masks": "m"}),
])
def test_task_output_rules(task, outputs) -> None:
    with pytest.raises(ContractError, match="^outputs"):
        ModelContract.from_dict(_doc(task=task, outputs=outputs))


def test_missing_and_malformed() -> None:
    with pytest.raises(ContractError, match="no 'convserve' entry"):
        ModelContract.from_json(None)
    with pytest.raises(ContractError, match="not valid JSON"):
        ModelContract.from_json("{nope")
    with pytest.raises(ContractError, match="^outputs: required field missing"):
        ModelContract.from_json(json.dumps({"task": "classification", "labels": ["a"], "input": _input()}))
    with pytest.raises(ContractError, match="^contract: expected an object, got a list"):
        ModelContract.from_json("[1, 2]")


def test_check_io() -> None:
    c = ModelContract.from_dict(_doc())
    check_io(c, [("images", "tensor(uint8)", ["batch", 32, 32, 3])], [("logits", "tensor(float)", ["batch", 2])])
    with pytest.raises(ContractError, match="^input.dtype"):
        check_io(c, [("images", "tensor(float)", ["batch", 32, 32, 3])], [("logits", "", ["n", 2])])
    with pytest.raises(ContractError, match="is not \\[N, 32, 32, 3\\]"):
        check_io(c, [("images", "tensor(uint8)", ["batch", 3, 32, 32])], [("logits", "", ["n", 2])])
    with pytest.raises(ContractError, match="^input.name"):
        check_io(c, [("pixels", "tensor(uint8)", ["batch", 32, 32, 3])], [("logits", "", ["n", 2])])
    with pytest.raises(ContractError, match="^batch.dynamic: true, but the graph's batch axis is fixed at 1"):
        check_io(c, [("images", "tensor(uint8)", [1, 32, 32, 3])], [("logits", "", [1, 2])])
    with pytest.raises(ContractError, match="^outputs.scores: the graph has no output named 'logits'"):
        check_io(c, [("images", "tensor(uint8)", ["n", 32, 32, 3])], [("probs", "", ["n", 2])])
    with pytest.raises(ContractError, match="^outputs.scores: output 'logits' has rank 1"):
        check_io(c, [("images", "tensor(uint8)", ["n", 32, 32, 3])], [("logits", "", [2])])
    with pytest.raises(ContractError, match="^outputs.scores: output 'logits' has a fixed batch axis of 1"):
        check_io(c, [("images", "tensor(uint8)", ["n", 32, 32, 3])], [("logits", "", [1, 2])])


def test_fixed_batch_against_the_graph() -> None:
    fixed = lambda n: ModelContract.from_dict(_doc(batch={"dynamic": False, "size": n}))  # noqa: E731
    check_io(fixed(4), [("images", "tensor(uint8)", [4, 32, 32, 3])], [("logits", "", [4, 2])])
    check_io(fixed(1), [("images", "tensor(uint8)", [1, 32, 32, 3])], [("logits", "", [2])])  # no batch axis: ok at 1
    with pytest.raises(ContractError, match="^batch.size: the contract says 4, the graph's batch axis is 2"):
        check_io(fixed(4), [("images", "tensor(uint8)", [2, 32, 32, 3])], [("logits", "", [2, 2])])
    with pytest.raises(ContractError, match="^outputs.scores: output 'logits' has rank 1"):
        check_io(fixed(4), [("images", "tensor(uint8)", [4, 32, 32, 3])], [("logits", "", [2])])


def _keypoint_doc(**keypoints: object) -> dict:
    spec = {"names": ["head", "left_hand", "right_hand"], "skeleton": [[0, 1], [0, 2]], "sigmas": [0.03, 0.06, 0.06]}
    return _doc(task="keypoints", labels=["figure"], keypoints={**spec, **keypoints},
                outputs={"kind": "boxes", "boxes": "b", "scores": "s", "labels": "l", "keypoints": "k"})


def test_a_keypoint_contract_carries_names_skeleton_and_sigmas() -> None:
    c = ModelContract.from_dict(_keypoint_doc())
    assert c.keypoints is not None and c.keypoints.skeleton == [[0, 1], [0, 2]]
    assert ModelContract.from_json(c.to_json()) == c
    assert "keypoints" not in json.loads(ModelContract.from_dict(_doc()).to_json())  # other tasks' documents unchanged
    graph_in = [("images", "tensor(uint8)", ["n", 32, 32, 3])]
    out = [("b", "", ["n", 20, 4]), ("s", "", ["n", 20]), ("l", "", ["n", 20])]
    check_io(c, graph_in, [*out, ("k", "", ["n", 20, 3, 3])])
    with pytest.raises(ContractError, match=r"^outputs.keypoints: output 'k' has shape .*must be \[3, 3\]"):
        check_io(c, graph_in, [*out, ("k", "", ["n", 20, 17, 3])])


@pytest.mark.parametrize("doc,message", [
    (_keypoint_doc(skeleton=[[0, 3]]), r"keypoints.skeleton\[0\]: must be two indices in 0..2"),
    (_keypoint_doc(skeleton=[[0]]), r"keypoints.skeleton\[0\]: must be two indices"),
    (_keypoint_doc(sigmas=[0.1]), r"keypoints.sigmas: must hold one positive number per keypoint \(3\)"),
    (_keypoint_doc(sigmas=[0.1, 0.0, 0.1]), "keypoints.sigmas"),
    (_keypoint_doc(names=["a", "a", "b"]), "keypoints.names: empty or duplicate"),
    (_keypoint_doc(names=[]), "keypoints.names: must list at least one"),
    (_keypoint_doc(skeleton=[["a", 1]]), r"keypoints.skeleton\[0\]\[0\]: expected an integer"),
    ({**_keypoint_doc(), "keypoints": None}, "keypoints: required for keypoints"),
    ({**_keypoint_doc(), "outputs": {"kind": "boxes", "boxes": "b", "scores": "s", "labels": "l"}},
     "outputs.keypoints: required for keypoints"),
    ({**_doc(), "keypoints": _keypoint_doc()["keypoints"]}, "keypoints: not part of a classification model's"),
])
def test_keypoint_contract_errors_are_named(doc, message) -> None:
    with pytest.raises(ContractError, match=f"^{message}"):
        ModelContract.from_dict(doc)


def _embedding_doc(**embedding: object) -> dict:
    return _doc(task="embedding", labels=[], embedding={"dimension": 16, "metric": "cosine", **embedding},
                outputs={"kind": "l2_normalized", "embedding": "e"})


def test_an_embedding_contract_carries_dimension_and_metric_and_no_labels() -> None:
    c = ModelContract.from_dict(_embedding_doc())
    assert c.embedding is not None and (c.embedding.dimension, c.embedding.metric) == (16, "cosine")
    assert c.labels == [] and ModelContract.from_json(c.to_json()) == c
    assert "embedding" not in json.loads(ModelContract.from_dict(_doc()).to_json())  # other tasks' documents unchanged
    graph_in = [("images", "tensor(uint8)", ["n", 32, 32, 3])]
    check_io(c, graph_in, [("e", "", ["n", 16])])
    check_io(c, graph_in, [("e", "", ["n", "d"])])  # a symbolic length is the graph's business
    with pytest.raises(ContractError, match=r"^embedding.dimension: the contract says 16, the graph's 'e' output"):
        check_io(c, graph_in, [("e", "", ["n", 8])])


@pytest.mark.parametrize("doc,message", [
    (_embedding_doc(dimension=0), r"embedding.dimension: must be in 1..4096"),
    (_embedding_doc(metric="l2"), r"embedding.metric: must be one of \['cosine'\]"),
    ({**_embedding_doc(), "embedding": None}, "embedding: required for embedding"),
    ({**_embedding_doc(), "labels": ["a"]}, "labels: a embedding model has no classes"),
    ({**_embedding_doc(), "outputs": {"kind": "logits", "embedding": "e"}}, "outputs.kind: a embedding model's"),
    ({**_doc(), "embedding": {"dimension": 4}}, "embedding: not part of a classification model's"),
    ({**_doc(), "labels": []}, "labels: must list at least one class name"),
])
def test_embedding_contract_errors_are_named(doc, message) -> None:
    with pytest.raises(ContractError, match=f"^{message}"):
        ModelContract.from_dict(doc)
