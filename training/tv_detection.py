"""torchvision's own detectors (SSDlite, Faster R-CNN, Mask R-CNN, Keypoint R-CNN) behind the ConvNet interface.

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
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor

from core.contract import KeypointSpec, OutputSpec
from training.convnet import ConvNet

BUILDERS = {
    "ssdlite320_mobilenet_v3_large": tvd.ssdlite320_mobilenet_v3_large,
    "fasterrcnn_mobilenet_v3_large_320_fpn": tvd.fasterrcnn_mobilenet_v3_large_320_fpn,
}

# torchvision's settings for fasterrcnn_mobilenet_v3_large_320_fpn (its low-resolution
# MobileNetV3-Large FPN), which torchvision publishes for Faster R-CNN only: Keypoint R-CNN
# is built here on the same backbone, anchors and proposal counts (keypointrcnn_resnet50_fpn,
# torchvision's own, is 59 M parameters: minutes a step on a CPU).
_MOBILE_320 = {"min_size": 320, "max_size": 320, "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 150,
               "rpn_score_thresh": 0.05}


def _mobilenet_320_fpn() -> tuple[nn.Module, AnchorGenerator]:
    """torchvision's MobileNetV3-Large FPN backbone (random init, every layer trainable) and its anchors."""
    backbone = _mobilenet_extractor(mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d), True, 6)
    sizes = ((32, 64, 128, 256, 512),) * 3
    return backbone, AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def maskrcnn_mobilenet_v3_large_320_fpn(num_classes: int) -> tvd.MaskRCNN:
    """Mask R-CNN (He et al. 2017) on torchvision's 320-pixel MobileNetV3-Large FPN."""
    backbone, anchors = _mobilenet_320_fpn()
    return tvd.MaskRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **_MOBILE_320)


def keypointrcnn_mobilenet_v3_large_320_fpn(num_classes: int, num_keypoints: int) -> tvd.KeypointRCNN:
    """Keypoint R-CNN (He et al. 2017) on torchvision's 320-pixel MobileNetV3-Large FPN, with a
    lighter keypoint head than torchvision's: 4 convolutions of 256 channels instead of 8 of
    512 (16x fewer multiply-adds per object: the published head made a 147 MB file that took
    seconds an image on 2 cores), and at most 20 objects an image (COCO's keypoint protocol)."""
    backbone, anchors = _mobilenet_320_fpn()
    head = KeypointRCNNHeads(backbone.out_channels, (256,) * 4)
    return tvd.KeypointRCNN(backbone, num_classes, rpn_anchor_generator=anchors, keypoint_head=head,
                            keypoint_predictor=KeypointRCNNPredictor(256, num_keypoints), box_detections_per_img=20,
                            **_MOBILE_320)


class TorchvisionDetector(ConvNet):
    """uint8 NHWC in; in eval mode forward returns torchvision's per-image dicts. Subclasses
    (Mask R-CNN, Keypoint R-CNN) name the targets they train on besides boxes and labels
    (``targets``) and how one image's dict becomes the graph's outputs (:meth:`graph_outputs`)."""

    output_spec = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels", nms_in_graph=True)
    batchable = False
    background_label = True
    targets: tuple[str, ...] = ()  # training targets besides boxes and labels

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        self.core = BUILDERS[arch](weights=None, weights_backbone=None, num_classes=num_classes + 1)

    @staticmethod
    def _images(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.permute(0, 3, 1, 2).float().div(255.0).unbind(0))

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.core(self._images(x))

    def loss(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1, **{k: t[k] for k in self.targets}}
                   for t in targets]
        return sum(self.core(self._images(images), shifted).values())

    @staticmethod
    def graph_outputs(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One image's torchvision dict -> the outputs ``output_spec`` names, in its order."""
        return out["boxes"], out["scores"], out["labels"]

    def export_module(self) -> nn.Module:
        return TorchvisionDetectorExport(self)


class TorchvisionDetectorExport(nn.Module):
    """[1, H, W, 3] uint8 -> the detector's graph outputs: boxes [K, 4], scores [K], labels [K]
    (0 = background), then masks [K, H, W] or keypoints [K, P, 3]."""

    def __init__(self, detector: TorchvisionDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.detector.graph_outputs(self.detector.core(TorchvisionDetector._images(x))[0])


class TorchvisionInstanceDetector(TorchvisionDetector):
    """Mask R-CNN: boxes, scores and labels as the detectors, plus masks [K, H, W]: each object's
    mask probability pasted into the model input (torchvision's paste_masks_in_image)."""

    output_spec = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels", masks="masks",
                             nms_in_graph=True)
    targets = ("masks",)

    def __init__(self, arch: str, num_classes: int) -> None:
        ConvNet.__init__(self)
        self.core = maskrcnn_mobilenet_v3_large_320_fpn(num_classes + 1)

    @staticmethod
    def graph_outputs(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return out["boxes"], out["scores"], out["labels"], out["masks"][:, 0]


class TorchvisionKeypointDetector(TorchvisionDetector):
    """Keypoint R-CNN: boxes, scores and labels as the detectors, plus keypoints [K, P, 3]
    (x, y in input pixels; the confidence: the sigmoid of torchvision's keypoint heatmap score)."""

    output_spec = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels", keypoints="keypoints",
                             nms_in_graph=True)
    targets = ("keypoints",)

    def __init__(self, arch: str, num_classes: int, keypoints: KeypointSpec) -> None:
        ConvNet.__init__(self)
        self.keypoint_spec = keypoints
        self.core = keypointrcnn_mobilenet_v3_large_320_fpn(num_classes + 1, len(keypoints.names))

    @staticmethod
    def graph_outputs(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        points = torch.cat([out["keypoints"][..., :2], torch.sigmoid(out["keypoints_scores"]).unsqueeze(-1)], -1)
        return out["boxes"], out["scores"], out["labels"], points
