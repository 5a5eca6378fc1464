"""What a trained model becomes: the module exported to ONNX and the contract describing it.

Training validates through :func:`predictor` on exactly the module and contract that
export.onnx_export writes, and core.evaluation scores both the same way, so the metrics in
a model's provenance are what ``python -m export.evaluate`` reports for the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.contract import COLORS, BatchSpec, InputSpec, ModelContract
from core.evaluation import Predict
from core.tasks import TASKS, Outputs
from training.models import ConvNet

INPUT_NAME = "images"
BACKGROUND = "__background__"


def graph_contract(model: ConvNet, task: str, classes: list[str], size: int,
                   fixed_batch: int | None = None, channels: int = 3) -> ModelContract:
    """The contract of ``model``'s exported graph (provenance left for the exporter to add).

    ``fixed_batch``: export a graph that always takes this many images (some accelerators
    and compilers want static shapes); models that take one image at a time are fixed at 1.
    """
    if not model.batchable:
        if fixed_batch not in (None, 1):
            raise ValueError(f"this architecture exports one image per call; "
                             f"it cannot have a fixed batch of {fixed_batch}")
        fixed_batch = 1
    labels = [BACKGROUND, *classes] if model.background_label else list(classes)
    if not TASKS[task].layout.labelled:  # an embedding model's training identities are not its output
        labels = []
    resize = TASKS[task].default_resize
    inp = InputSpec(name=INPUT_NAME, height=size, width=size, resize=resize, channels=channels or 3,
                    color=COLORS[channels or 3])
    batch = BatchSpec(dynamic=True) if fixed_batch is None else BatchSpec(dynamic=False, size=fixed_batch)
    contract = ModelContract(task=task, labels=labels, input=inp, outputs=model.output_spec, batch=batch,
                             keypoints=model.keypoint_spec, embedding=model.embedding_spec)
    contract.validate()
    return contract


def predictor(model: ConvNet, contract: ModelContract, device: torch.device | str = "cpu") -> Predict:
    """A core.evaluation ``predict`` running ``model``'s export module in PyTorch (eval mode,
    no gradients): uint8 images in, one output dict per image out, split like ONNX outputs."""
    module = model.export_module().eval()
    names = contract.outputs.tensor_names()
    task = TASKS[contract.task]

    @torch.no_grad()
    def predict(images: np.ndarray) -> list[Outputs]:
        out: Any = module(torch.from_numpy(images).to(device))
        tensors = out if isinstance(out, (tuple, list)) else (out,)
        arrays = {n: t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                  for n, t in zip(names, tensors)}
        return task.split(arrays, len(images), contract.outputs)

    return predict
