"""Model contracts and model files made for tests: a contract from a few fields, and a copy
of a real model whose contract document was edited as it stands (nothing checks it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.contract import METADATA_KEY, ModelContract


def contract(task: str, outputs: dict[str, Any], labels: tuple[str, ...] = ("bg", "a", "b"),
             batch: dict[str, Any] | None = None, keypoints: dict[str, Any] | None = None,
             embedding: dict[str, Any] | None = None) -> ModelContract:
    """A validated contract of an 8x8 ``task`` model with ``outputs`` (and ``batch``, ``keypoints``,
    ``embedding``)."""
    doc: dict[str, Any] = {"task": task, "labels": list(labels), "input": {"name": "images", "height": 8, "width": 8},
                           "outputs": outputs}
    if batch:
        doc["batch"] = batch
    if keypoints:
        doc["keypoints"] = keypoints
    if embedding:
        doc["embedding"] = embedding
    return ModelContract.from_dict(doc)


def with_contract(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the model ``src`` at ``dst`` whose contract document ``edit`` (a function of
    the parsed JSON) has changed, written as it stands: nothing checks it on the way."""
    import onnx

    model = onnx.load(str(src))
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    doc = json.loads(entry.value)
    edit(doc)
    entry.value = json.dumps(doc)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst
