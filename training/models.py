"""Model builders on torchvision architectures, behind one interface: :class:`ConvNet`.

Every model trained here takes uint8 NHWC RGB, so the arithmetic preprocessing lives inside
the exported ONNX graph and the service feeds raw pixels. A ConvNet says how it is trained
(:meth:`ConvNet.loss`), which module becomes the graph (:meth:`ConvNet.export_module`) and
what that graph outputs (``output_spec``, ``batchable``, ``background_label``): training,
validation and export ask the model instead of testing architecture names.

Random init by default; ``weights`` may name a local state-dict file (e.g. torchvision
weights downloaded elsewhere): no hub downloads happen anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models.segmentation.deeplabv3 import _deeplabv3_mobilenetv3
from torchvision.models.segmentation.lraspp import _lraspp_mobilenetv3

from core.contract import OutputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8 NHWC RGB -> float NCHW, (x/255 - mean)/std (buffers, not saved in checkpoints)."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float() * self.scale - self.shift


class ConvNet(nn.Module):
    """The interface every trainable model implements (uint8 [N, H, W, 3] in).

    ``output_spec`` names the exported graph's outputs (core.contract.OutputSpec), in the
    order :meth:`export_module` returns them; ``batchable`` is False for graphs that take
    exactly one image; ``background_label`` is True when label 0 of the graph is a
    background class that the dataset does not list.
    """

    output_spec: OutputSpec
    batchable: bool = True
    background_label: bool = False

    def loss(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def export_module(self) -> nn.Module:
        """The module that becomes the ONNX graph (uint8 NHWC in, ``output_spec``'s outputs out)."""
        return self


class Normalized(ConvNet):
    """Normalize, then ``core`` (a torchvision classifier or segmenter); dict outputs unwrapped."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core(self.normalize(x))
        return out["out"] if isinstance(out, dict) else out

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(images), targets)


class Classifier(Normalized):
    """[N, C] logits."""

    output_spec = OutputSpec(kind="logits", scores="logits")


class Segmenter(Normalized):
    """[N, C, H, W] mask logits at input resolution; label 0 is background."""

    output_spec = OutputSpec(kind="mask_logits", masks="masks")


def _classifier(arch: str, num_classes: int, width_mult: float) -> ConvNet:
    if arch.startswith("mobilenet_v3"):
        return Classifier(getattr(tvm, arch)(weights=None, num_classes=num_classes, width_mult=width_mult))
    return Classifier(getattr(tvm, arch)(weights=None, num_classes=num_classes))


def _segmenter(arch: str, num_classes: int, width_mult: float) -> ConvNet:
    if arch == "lraspp_mobilenet_v3_large":
        core = _lraspp_mobilenetv3(tvm.mobilenet_v3_large(width_mult=width_mult, dilated=True), num_classes)
    elif arch == "deeplabv3_mobilenet_v3_large":
        core = _deeplabv3_mobilenetv3(tvm.mobilenet_v3_large(width_mult=width_mult, dilated=True), num_classes, aux=False)
    else:
        core = tvm.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    return Segmenter(core)


def _detector(arch: str, num_classes: int, width_mult: float) -> ConvNet:
    from training.centernet import CenterNetDetector
    from training.tv_detection import TorchvisionDetector

    if arch.startswith("centernet_"):
        return CenterNetDetector(num_classes, backbone=arch.removeprefix("centernet_"), width_mult=width_mult)
    return TorchvisionDetector(arch, num_classes)


ARCHITECTURES: dict[str, dict[str, Callable[[str, int, float], ConvNet]]] = {
    "classification": {a: _classifier for a in ("mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50")},
    "segmentation": {a: _segmenter for a in ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50")},
    "detection": {a: _detector for a in ("centernet_mobilenet_v3_small", "centernet_mobilenet_v3_large",
                                         "ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")},
}
DEFAULT_ARCH = {"classification": "mobilenet_v3_small", "segmentation": "lraspp_mobilenet_v3_large",
                "detection": "centernet_mobilenet_v3_small"}


def build_model(task: str, arch: str, num_classes: int, width_mult: float = 1.0,
                weights: Path | str | None = None) -> ConvNet:
    """Build ``arch`` for ``task`` as a :class:`ConvNet`.

    ``weights``: a local state-dict file for the network (e.g. torchvision pretrained
    weights you downloaded yourself); tensors whose shape does not fit (the class head) are skipped.
    """
    try:
        builder = ARCHITECTURES[task][arch]
    except KeyError:
        known = {t: sorted(a) for t, a in ARCHITECTURES.items()}
        raise ValueError(f"unknown architecture {arch!r} for {task}; known: {known}") from None
    model = builder(arch, num_classes, width_mult)
    # torchvision's MobileNetV3 sets BatchNorm momentum 0.01, tuned for ImageNet-length runs;
    # on small datasets the running statistics then lag the weights for many epochs and
    # evaluation-mode outputs are garbage. 0.1 (PyTorch's default) tracks them in time.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    if weights:
        target = model.core if hasattr(model, "core") else model
        state = torch.load(weights, map_location="cpu", weights_only=True)
        own = target.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        target.load_state_dict(fitting, strict=False)
        print(f"loaded {len(fitting)}/{len(own)} tensors from {weights}")
    return model
