"""Scoring a model on a dataset directory: the one evaluation training and export share.

:func:`evaluate` loads every image with core.imaging.load_input (the service's decode and
resize), runs ``predict`` in batches, and hands each image's outputs to the task's scorer
(core.tasks), which post-processes them exactly as the service answers requests. Training
validates with a PyTorch ``predict`` (the module that becomes the ONNX graph) and
export.evaluate with ONNX Runtime's, so the metrics a checkpoint records in its model's
provenance are the ones ``python -m export.evaluate`` reports for the exported file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from core.contract import ModelContract
from core.errors import ImageTooLarge, InvalidImage
from core.imaging import load_input
from core.tasks import TASKS, Outputs

log = logging.getLogger("convserve.evaluation")

Predict = Callable[[np.ndarray], list[Outputs]]  # uint8 [N, H, W, 3] -> one output dict per image
T = TypeVar("T")


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def evaluate(predict: Predict, contract: ModelContract, data: Path | str, batch_size: int = 16) -> dict[str, Any]:
    """The task's metrics for ``predict`` on the dataset at ``data`` (its task's on-disk format).

    Batches hold ``batch_size`` images, or the contract's fixed batch size. Files that are
    not images, or cannot be decoded, are skipped with a warning; the metrics say how many
    images were scored.
    """
    task = TASKS[contract.task]
    dataset = task.read_dataset(Path(data), verify=False)
    scorer = task.scorer(contract, dataset)
    size = contract.batch.max_size or batch_size
    scored = 0
    for chunk in batched(dataset.samples, size):
        loaded = []
        for sample in chunk:
            try:
                _, arr, geometry = load_input(sample.image, contract.input)
            except (InvalidImage, ImageTooLarge) as exc:
                log.warning("skipping %s: %s", sample.image, exc)
                continue
            loaded.append((sample, arr, geometry))
        if not loaded:
            continue
        outputs = predict(np.stack([arr for _, arr, _ in loaded]))
        for (sample, _, geometry), out in zip(loaded, outputs):
            scorer.add(sample, out, geometry)
        scored += len(loaded)
    return {**scorer.compute(), "images": scored}
