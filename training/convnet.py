"""The interface every trainable model implements (:class:`ConvNet`) and the preprocessing
inside every exported graph (:class:`Normalize`). Its own module so that the model families
(training.models, training.centernet, training.tv_detection) build on it without importing
each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from core.contract import EmbeddingSpec, KeypointSpec, OutputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8 NHWC -> float NCHW, (x/255 - mean)/std (buffers, not saved in checkpoints).

    A one-channel (greyscale) input broadcasts to the three channels of an ImageNet-style
    network; ``channels=1`` keeps it one channel (for a network whose first layer takes one)."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 channels: int = 3) -> None:
        super().__init__()
        if channels == 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        c = len(mean)
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, c, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, c, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float() * self.scale - self.shift


class ConvNet(nn.Module):
    """The interface every trainable model implements (uint8 [N, H, W, C] in).

    ``output_spec`` names the exported graph's outputs (core.contract.OutputSpec), in the
    order :meth:`export_module` returns them; ``batchable`` is False for graphs that take
    exactly one image; ``background_label`` is True when label 0 of the graph is a
    background class that the dataset does not list. ``last_layers`` are the state-dict
    prefixes (within :meth:`weights_target`) of the layers sized by the class count: what
    transfer learning replaces and what ``freeze_backbone`` leaves trainable.
    """

    output_spec: OutputSpec
    batchable: bool = True
    background_label: bool = False
    last_layers: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()   # optional graph outputs this model can add (OutputSpec fields)
    keypoint_spec: KeypointSpec | None = None  # keypoint models: names, skeleton, sigmas (into the contract)
    embedding_spec: EmbeddingSpec | None = None  # embedding models: dimension, metric (into the contract)

    def loss(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def export_module(self) -> nn.Module:
        """The module that becomes the ONNX graph (uint8 NHWC in, ``output_spec``'s outputs out)."""
        return self

    def weights_target(self) -> nn.Module:
        """The module a weights file describes (the torchvision network where there is one)."""
        return getattr(self, "core", self)

    def with_extras(self, names: list[str] | tuple[str, ...]) -> ConvNet:
        """Export ``names`` (e.g. embedding, cam) as extra graph outputs; ValueError if unsupported."""
        unknown = [n for n in names if n not in self.extras]
        if unknown:
            raise ValueError(f"this architecture cannot export {unknown}; it can export {list(self.extras) or 'none'}")
        self.output_spec = dataclasses.replace(self.output_spec, **{n: n for n in names})
        return self

    def freeze_backbone(self) -> None:
        """Feature extraction: only the parameters under ``last_layers`` train; every other
        parameter stops taking gradients and every batch norm outside them keeps its running
        statistics (it stays in eval mode, see :meth:`train`)."""
        target = self.weights_target()
        for name, p in target.named_parameters():
            p.requires_grad_(under_any(name, self.last_layers))
        self._frozen_norms = [m for name, m in target.named_modules()
                              if isinstance(m, nn.modules.batchnorm._BatchNorm)
                              and not under_any(name + ".", self.last_layers)]
        self.train(self.training)

    def train(self, mode: bool = True) -> ConvNet:
        super().train(mode)
        for m in getattr(self, "_frozen_norms", ()):
            m.eval()
        return self


def under_any(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the state-dict key ``name`` lies under one of ``prefixes``."""
    return any(name.startswith(p) for p in prefixes)
