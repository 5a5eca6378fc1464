import json

import pytest

from service.contract import ContractError, ModelContract, check_io


def _doc(**over):
    doc = {"task": "classification", "labels": ["a", "b"],
           "input": {"name": "images", "height": 32, "width": 32},
           "outputs": {"kind": "logits", "scores": "logits"}}
    doc.update(over)
    return doc


def test_round_trip() -> None:
    c = ModelContract.from_dict(_doc())
    assert ModelContract.from_json(c.to_json()) == c


@pytest.mark.parametrize("over,msg", [
    ({"task": "pose"}, "task must be one of"),
    ({"labels": []}, "labels must be"),
    ({"input": {"name": "images", "height": 32, "width": 32, "dtype": "float32"}}, "uint8"),
    ({"input": {"name": "images", "height": 32, "width": 32, "resize": "crop"}}, "resize"),
    ({"outputs": {"kind": "logits"}}, "must name"),
    ({"outputs": {"kind": "boxes", "scores": "x"}}, "kind must be"),
    ({"batch": {"dynamic": False}}, "fixed batch"),
    ({"input": {"name": "images", "height": 32, "width": 32, "bogus": 1}}, "unknown or missing field"),
])
def test_invalid_documents_are_named(over, msg) -> None:
    with pytest.raises(ContractError, match=msg):
        ModelContract.from_dict(_doc(**over))


def test_missing_and_malformed() -> None:
    with pytest.raises(ContractError, match="no 'convserve' entry"):
        ModelContract.from_json(None)
    with pytest.raises(ContractError, match="not valid JSON"):
        ModelContract.from_json("{nope")
    with pytest.raises(ContractError, match="lacks required keys"):
        ModelContract.from_json(json.dumps({"task": "classification"}))


def test_check_io() -> None:
    c = ModelContract.from_dict(_doc())
    check_io(c, [("images", "tensor(uint8)", ["batch", 32, 32, 3])], [("logits", "tensor(float)", ["batch", 2])])
    with pytest.raises(ContractError, match="must be uint8"):
        check_io(c, [("images", "tensor(float)", ["batch", 32, 32, 3])], [("logits", "", [])])
    with pytest.raises(ContractError, match="does not match"):
        check_io(c, [("images", "tensor(uint8)", ["batch", 3, 32, 32])], [("logits", "", [])])
    with pytest.raises(ContractError, match="batch axis is fixed"):
        check_io(c, [("images", "tensor(uint8)", [1, 32, 32, 3])], [("logits", "", [])])
    with pytest.raises(ContractError, match="lacks outputs"):
        check_io(c, [("images", "tensor(uint8)", ["n", 32, 32, 3])], [("probs", "", [])])
