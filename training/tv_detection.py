"""torchvision's own detectors (SSDlite, Faster R-CNN) behind the ConvNet interface.

They normalise and resize inside the model (their GeneralizedRCNNTransform), so they take
uint8 NHWC directly. Label 0 is background (torchvision's convention): dataset labels are
shifted by one on the way in, and the exported contract lists ``__background__`` first.

Export limitation, by torchvision's design: the graph takes exactly one image per call
(pytorch/vision#2311) and its outputs have no batch axis, so these models are exported with
``batch: {dynamic: false, size: 1}`` and served one image at a time. CenterNet
(training/centernet.py) is the batchable default.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import detection as tvd

from core.contract import OutputSpec
from training.convnet import ConvNet

BUILDERS = {
    "ssdlite320_mobilenet_v3_large": tvd.ssdlite320_mobilenet_v3_large,
    "fasterrcnn_mobilenet_v3_large_320_fpn": tvd.fasterrcnn_mobilenet_v3_large_320_fpn,
}


class TorchvisionDetector(ConvNet):
    """uint8 NHWC in; in eval mode forward returns torchvision's per-image dicts."""

    output_spec = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels", nms_in_graph=True)
    batchable = False
    background_label = True

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        self.core = BUILDERS[arch](weights=None, weights_backbone=None, num_classes=num_classes + 1)

    @staticmethod
    def _images(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.permute(0, 3, 1, 2).float().div(255.0).unbind(0))

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.core(self._images(x))

    def loss(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        return sum(self.core(self._images(images), shifted).values())

    def export_module(self) -> nn.Module:
        return TorchvisionDetectorExport(self)


class TorchvisionDetectorExport(nn.Module):
    """[1, H, W, 3] uint8 -> boxes [K, 4], scores [K], labels [K] (0 = background)."""

    def __init__(self, detector: TorchvisionDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector.core(TorchvisionDetector._images(x))[0]
        return out["boxes"], out["scores"], out["labels"]
