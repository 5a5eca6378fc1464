"""Model builders on torchvision architectures, and the uint8-input wrapper that is exported.

Every model trains and exports wrapped in :class:`Normalized`: it takes uint8 NHWC RGB, so
the arithmetic preprocessing lives inside the ONNX graph and the service feeds raw pixels.
Random init by default; ``weights`` may name a local torchvision checkpoint (.pth) for the
backbone or the whole model (no hub downloads happen anywhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.segmentation.deeplabv3 import _deeplabv3_mobilenetv3
from torchvision.models.segmentation.lraspp import _lraspp_mobilenetv3

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """uint8 NHWC RGB -> float NCHW, (x/255 - mean)/std -> ``core``; unwraps dict outputs."""

    def __init__(self, core: nn.Module, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float() * self.scale - self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core(self.normalize(x))
        return out["out"] if isinstance(out, dict) else out


def _classifier(arch: str, num_classes: int, width_mult: float) -> nn.Module:
    if arch.startswith("mobilenet_v3"):
        return getattr(tvm, arch)(weights=None, num_classes=num_classes, width_mult=width_mult)
    return getattr(tvm, arch)(weights=None, num_classes=num_classes)


def _segmenter(arch: str, num_classes: int, width_mult: float) -> nn.Module:
    if arch == "lraspp_mobilenet_v3_large":
        return _lraspp_mobilenetv3(tvm.mobilenet_v3_large(width_mult=width_mult, dilated=True), num_classes)
    if arch == "deeplabv3_mobilenet_v3_large":
        return _deeplabv3_mobilenetv3(tvm.mobilenet_v3_large(width_mult=width_mult, dilated=True), num_classes, aux=False)
    if arch == "fcn_resnet50":
        return tvm.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    raise ValueError(arch)


def _detector(arch: str, num_classes: int, width_mult: float) -> nn.Module:
    from training.centernet import CenterNet
    from training.tv_detection import BUILDERS, TorchvisionDetector

    if arch.startswith("centernet_"):
        return CenterNet(num_classes, backbone=arch.removeprefix("centernet_"), width_mult=width_mult)
    if arch in BUILDERS:
        return TorchvisionDetector(arch, num_classes)
    raise ValueError(arch)


ARCHITECTURES: dict[str, dict[str, Callable[[str, int, float], nn.Module]]] = {
    "classification": {a: _classifier for a in ("mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50")},
    "segmentation": {a: _segmenter for a in ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50")},
    "detection": {a: _detector for a in ("centernet_mobilenet_v3_small", "centernet_mobilenet_v3_large",
                                         "ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")},
}


def build_model(task: str, arch: str, num_classes: int, width_mult: float = 1.0,
                weights: Path | str | None = None) -> nn.Module:
    """Build ``arch`` for ``task`` wrapped in :class:`Normalized` (models that normalise
    themselves, torchvision's detectors, come back as they are: they take uint8 already).

    ``weights``: a local state-dict file for the core model (e.g. torchvision pretrained
    weights you downloaded yourself); keys that do not fit (the class head) are skipped.
    """
    try:
        builder = ARCHITECTURES[task][arch]
    except KeyError:
        known = {t: sorted(a) for t, a in ARCHITECTURES.items()}
        raise ValueError(f"unknown architecture {arch!r} for {task}; known: {known}") from None
    core = builder(arch, num_classes, width_mult)
    # torchvision's MobileNetV3 sets BatchNorm momentum 0.01, tuned for ImageNet-length runs;
    # on small datasets the running statistics then lag the weights for many epochs and
    # evaluation-mode outputs are garbage. 0.1 (PyTorch's default) tracks them in time.
    for m in core.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        own = core.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        core.load_state_dict(fitting, strict=False)
        print(f"loaded {len(fitting)}/{len(own)} tensors from {weights}")
    return core if getattr(core, "takes_uint8", False) else Normalized(core)
