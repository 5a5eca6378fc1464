"""ONNX Runtime sessions: the shared CPU arena keeps answers exact when models run at once; a
model's contract is checked against its graph when it is loaded (sizes bounded, one label per
class of the graph, or of a run where the graph leaves the class count symbolic)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.errors import ContractError
from core.onnx_contract import check_classes, parse_contract, read_contract
from core.repository import discover
from core.runtime import OnnxModel, session_options
from tests.support.models import with_contract

ROOT = Path(__file__).resolve().parents[2]


def test_sessions_share_one_arena_and_concurrent_runs_stay_exact() -> None:
    assert session_options(1).get_session_config_entry("session.use_env_allocators") == "1"
    models = [OnnxModel.load(e.path, e.name, e.version, "cpu", 1) for e in discover(ROOT / "models")]
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (n, m.contract.input.height, m.contract.input.width, 3), dtype=np.uint8)
              for m in models for n in (1, 3, 8)]
    owners = [m for m in models for _ in (1, 3, 8)]
    alone = [m.infer(x) for m, x in zip(owners, inputs)]
    with ThreadPoolExecutor(4) as pool:  # every model, every size, four at a time, twice over
        together = list(pool.map(lambda mx: mx[0].infer(mx[1]), list(zip(owners, inputs)) * 2))
    for expected, got in zip(alone * 2, together):
        for a, b in zip(expected, got):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


# --- the contract checked against the graph at load ------------------------------------------

CLASSIFIER = ROOT / "models" / "shapes-classifier" / "1" / "model.onnx"
SEGMENTER = ROOT / "models" / "shapes-segmenter" / "1" / "model.onnx"


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(labels=d["labels"][:4]),
     "labels: the contract lists 4 labels, but the graph's scores output 'logits' has 5 classes"),
    (lambda d: d.update(labels=[*d["labels"], "extra"]),
     "labels: the contract lists 6 labels, but the graph's scores output 'logits' has 5 classes"),
    (lambda d: d.update(labels=[f"class-{i}" for i in range(20_000)]),
     "labels: 20000 labels, more than the 10000 a model may have"),
    (lambda d: d["labels"].__setitem__(0, "x" * 201), "labels[0]: 201 characters, more than the 200"),
    (lambda d: d["provenance"].update(notes="x" * 1_000_000), "bytes, more than the 1000000 a model may carry"),
])
def test_a_contract_that_disagrees_with_the_graph_or_is_too_large_is_refused_at_load(tmp_path, edit, message) -> None:
    path = with_contract(CLASSIFIER, tmp_path / "model.onnx", edit)
    with pytest.raises(ContractError, match=re.escape(message)):
        OnnxModel.load(path, "bad", "1", "cpu", 1)
    with pytest.raises(ContractError, match=re.escape(message)):
        read_contract(path)  # the same checks where the file is read without a session


def test_a_class_count_the_graph_leaves_symbolic_is_checked_on_a_run(tmp_path) -> None:
    """The segmenter's masks are [N, C, H, W] with every dimension symbolic: loading cannot
    count its classes, a run (the service's warm-up) does."""
    path = with_contract(SEGMENTER, tmp_path / "model.onnx", lambda d: d.update(labels=d["labels"][:5]))
    model = OnnxModel.load(path, "bad", "1", "cpu", 1)
    with pytest.raises(ContractError, match=re.escape(
            "labels: the contract lists 5 labels, but a run's masks output 'masks' has 6 classes")):
        model.check_answer(model.infer(_blank(model))[0])
    for entry in discover(ROOT / "models"):  # the shipped models agree with their graphs
        good = OnnxModel.load(entry.path, entry.name, entry.version, "cpu", 1)
        good.check_answer(good.infer(_blank(good))[0])


def _blank(model: OnnxModel) -> np.ndarray:
    i = model.contract.input
    return np.zeros((1, i.height, i.width, i.channels), np.uint8)


def test_class_axes_are_counted_from_the_end_and_symbolic_ones_pass() -> None:
    contract = read_contract(CLASSIFIER)
    check_classes(contract, {"logits": [1, 5], "cam": ["n", 5, 4, 4]})
    check_classes(contract, {"logits": [5], "cam": [5, 4, 4]})  # a fixed batch of 1 without its axis
    check_classes(contract, {"logits": ["batch", "classes"], "cam": ["batch", None, 4, 4]})
    with pytest.raises(ContractError, match="cam output 'cam' has 7 classes"):
        check_classes(contract, {"logits": ["batch", 5], "cam": ["batch", 7, 4, 4]})
    assert parse_contract(contract.to_json()) == contract
