"""Training checkpoints: the one module that writes and reads them.

A checkpoint is a plain dict of tensors and JSON-like values, so
``torch.load(path, weights_only=True)`` reads it without running any code:

- ``model``: the ConvNet's state dict (training.models);
- ``config``: the training configuration (training.train.TrainConfig as a dict: task, arch,
  classes, size, width_mult, channels, ...), enough to rebuild the model
  (training.models.load_checkpoint);
- ``metrics``: the epoch's validation metrics (core.evaluation); ``epoch`` (counted from 0),
  ``step`` (optimiser steps so far) and ``history`` (one record per epoch);
- in a resumable checkpoint only (``last.pt``), what :func:`restore` gives back to continue:
  ``optimizer`` and ``scheduler`` (their state dicts) and ``best`` (the best validation
  score so far).

training.train writes ``<out>/best.pt`` (the best epoch) and ``<out>/last.pt`` (every epoch,
resumable); training.models rebuilds a model from one (load_checkpoint, for export and
visualize) or takes one as a weights file to start from (:func:`model_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

BEST = "best.pt"   # the epoch with the best validation score
LAST = "last.pt"   # the latest epoch, resumable


def save(path: Path, model: nn.Module, config: dict[str, Any], metrics: dict[str, Any], epoch: int, step: int,
         history: list[dict[str, Any]], optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
         best: float | None = None) -> None:
    """Write a checkpoint of ``model`` to ``path``. Given ``optimizer`` (with ``scheduler``
    and ``best``), it is resumable: :func:`restore` continues from it."""
    state: dict[str, Any] = {"model": model.state_dict(), "config": config, "metrics": metrics, "epoch": epoch,
                             "step": step, "history": history}
    if optimizer is not None:
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), best=best)
    torch.save(state, path)


def read(path: Path | str, device: torch.device | str = "cpu") -> Any:
    """What the file at ``path`` holds, tensors on ``device`` (``weights_only``: no code runs)."""
    return torch.load(path, map_location=device, weights_only=True)


def metrics(path: Path) -> dict[str, Any]:
    """The validation metrics a checkpoint recorded."""
    return read(path)["metrics"]


def model_weights(content: Any) -> Any:
    """The network weights in what a weights file holds: a checkpoint's ``model`` entry, or
    the content as it is (a plain state dict, e.g. torchvision's published files)."""
    if isinstance(content, dict) and isinstance(content.get("model"), dict) and "config" in content:
        return content["model"]
    return content


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """Load a resumable checkpoint into ``model`` and ``optimizer``; returns the rest of it
    (epoch, step, best, history, scheduler state, config, metrics)."""
    ck = read(path, device)
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    return {k: v for k, v in ck.items() if k not in ("model", "optimizer")}
