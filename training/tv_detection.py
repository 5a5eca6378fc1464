"""torchvision's own detectors (SSDlite, Faster R-CNN) behind the project's uint8 interface.

They normalise and resize inside the model (their GeneralizedRCNNTransform), so they take
uint8 NHWC directly rather than through training.models.Normalized. Label 0 is background
(torchvision's convention); dataset labels are shifted by one on the way in.

Export limitation, by torchvision's design: the graph takes exactly one image per call
(pytorch/vision#2311), so the contract says ``batch: {dynamic: false, size: 1}`` and the
service runs these models one image at a time. CenterNet (training/centernet.py) is the
batchable default.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import detection as tvd

BUILDERS = {
    "ssdlite320_mobilenet_v3_large": tvd.ssdlite320_mobilenet_v3_large,
    "fasterrcnn_mobilenet_v3_large_320_fpn": tvd.fasterrcnn_mobilenet_v3_large_320_fpn,
}


class TorchvisionDetector(nn.Module):
    """uint8 NHWC in; training returns the summed loss, eval torchvision's per-image dicts."""

    takes_uint8 = True

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        self.model = BUILDERS[arch](weights=None, weights_backbone=None, num_classes=num_classes + 1)

    @staticmethod
    def _images(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.permute(0, 3, 1, 2).float().div(255.0).unbind(0))

    def forward(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training:
            shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets or []]
            return sum(self.model(self._images(x), shifted).values())
        return self.model(self._images(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image (boxes xyxy input pixels, scores, labels without the background shift)."""
        return [(o["boxes"], o["scores"], o["labels"] - 1) for o in self.model(self._images(x))]


class TorchvisionDetectorExport(nn.Module):
    """[1, H, W, 3] uint8 -> boxes [K, 4], scores [K], labels [K] (0 = background)."""

    def __init__(self, detector: TorchvisionDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector.model(TorchvisionDetector._images(x))[0]
        return out["boxes"], out["scores"], out["labels"]
