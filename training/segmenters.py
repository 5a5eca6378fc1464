"""Segmentation networks: torchvision's, and a MobileNetV3 one with a decoder to stride 4.

torchvision's LR-ASPP predicts at output stride 8 and upsamples 8x: on the shipped
segmenter two thirds of the wrong pixels lay within 3 px of a shape's edge (star points and
triangle corners rounded off). :class:`FPNSegmenter` keeps LR-ASPP's attention head on the
stride-16 features and adds a top-down decoder (as DeepLabV3+ and FPN do): upsample, join
the stride-8 and then the stride-4 features, each step a depthwise-separable 3x3
convolution, classify at stride 4. It costs a few million multiply-adds more than LR-ASPP.

:data:`SEGMENTERS` is the architecture table: name -> how to build it and which layers a
new class count replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models.segmentation.deeplabv3 import _deeplabv3_mobilenetv3
from torchvision.models.segmentation.lraspp import _lraspp_mobilenetv3


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _separable(cin: int, cout: int) -> nn.Sequential:
    """3x3 depthwise + 1x1 pointwise, each with batch norm and ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU(inplace=True), _conv_bn_relu(cin, cout))


class FPNSegmenter(nn.Module):
    """MobileNetV3-Large (dilated, output stride 16) + LR-ASPP attention + decoder to stride 4.

    ``forward`` takes normalised float NCHW and returns ``{"out": logits}`` at input resolution,
    like torchvision's segmentation models."""

    def __init__(self, num_classes: int, width_mult: float = 1.0, inter: int = 128, mid: int = 64,
                 fine: int = 32) -> None:
        super().__init__()
        self.backbone = tvm.mobilenet_v3_large(weights=None, width_mult=width_mult, dilated=True).features
        # The last block at each output stride (found by a dry run, not hard-coded).
        last_at: dict[int, int] = {}
        with torch.no_grad():
            x = torch.zeros(1, 3, 64, 64)
            for i, block in enumerate(self.backbone):
                x = block(x)
                last_at[64 // x.shape[-1]] = i
        self.taps = (last_at[4], last_at[8], len(self.backbone) - 1)
        c4, c8, c16 = (self._channels(self.backbone[i]) for i in self.taps)
        self.cbr = _conv_bn_relu(c16, inter)
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c16, inter, 1, bias=False), nn.Sigmoid())
        self.fuse8 = _separable(inter + c8, mid)
        self.fuse4 = _separable(mid + c4, fine)
        self.classifier = nn.Conv2d(fine, num_classes, 1)

    @staticmethod
    def _channels(block: nn.Module) -> int:
        return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        taps = []
        for i, block in enumerate(self.backbone):
            x = block(x)
            if i in self.taps:
                taps.append(x)
        f4, f8, f16 = taps
        y = self.cbr(f16) * self.scale(f16)
        y = self.fuse8(torch.cat([F.interpolate(y, size=f8.shape[-2:], mode="bilinear", align_corners=False), f8], 1))
        y = self.fuse4(torch.cat([F.interpolate(y, size=f4.shape[-2:], mode="bilinear", align_corners=False), f4], 1))
        return {"out": F.interpolate(self.classifier(y), size=size, mode="bilinear", align_corners=False)}


@dataclass(frozen=True)
class SegmenterSpec:
    """One segmentation architecture: how to build it (``(num_classes, width_mult) -> network``,
    random init) and the state-dict prefixes of its class-count-sized layers (replaced when a
    weights file has another count)."""

    build: Callable[[int, float], nn.Module]
    last_layers: tuple[str, ...]


def _mobilenet_v3_large(width_mult: float) -> nn.Module:
    return tvm.mobilenet_v3_large(width_mult=width_mult, dilated=True)


def _torchvision_resnet50(builder: Callable[..., nn.Module]) -> Callable[[int, float], nn.Module]:
    """torchvision's ResNet-50 segmenter ``builder`` without its auxiliary head (it has no width multiplier)."""
    return lambda n, w: builder(weights=None, weights_backbone=None, num_classes=n, aux_loss=False)


# The segmentation architectures: name -> spec.
SEGMENTERS: dict[str, SegmenterSpec] = {
    "fpn_mobilenet_v3_large": SegmenterSpec(lambda n, w: FPNSegmenter(n, w), ("classifier.",)),
    "lraspp_mobilenet_v3_large": SegmenterSpec(
        lambda n, w: _lraspp_mobilenetv3(_mobilenet_v3_large(w), n),
        ("classifier.low_classifier.", "classifier.high_classifier.")),
    "deeplabv3_mobilenet_v3_large": SegmenterSpec(
        lambda n, w: _deeplabv3_mobilenetv3(_mobilenet_v3_large(w), n, aux=False), ("classifier.4.",)),
    "deeplabv3_resnet50": SegmenterSpec(_torchvision_resnet50(tvm.segmentation.deeplabv3_resnet50), ("classifier.4.",)),
    "fcn_resnet50": SegmenterSpec(_torchvision_resnet50(tvm.segmentation.fcn_resnet50), ("classifier.4.",)),
}


def spec_of(arch: str) -> SegmenterSpec:
    """The spec of segmentation architecture ``arch``; ValueError if there is none."""
    try:
        return SEGMENTERS[arch]
    except KeyError:
        raise ValueError(f"unknown segmentation architecture {arch!r}") from None


def build_network(arch: str, num_classes: int, width_mult: float) -> nn.Module:
    """The segmentation network for ``arch`` (random init)."""
    return spec_of(arch).build(num_classes, width_mult)
