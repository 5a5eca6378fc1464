"""A batchable instance segmenter: CenterNet with YOLACT's masks ("Real-time Instance
Segmentation", Bolya et al. 2019), on training.centernet's backbone, FPN and box heads.

Besides the centre heatmap, box size and centre offset, a ``coef`` head on the stride-8 map
gives M mask coefficients per cell, and a ``proto`` branch (the same map upsampled to stride 4)
gives M prototype masks shared by every object of the image. An object's mask is the sigmoid
of its centre cell's coefficients times the prototypes, kept inside its box (YOLACT's crop).
Decoding reads the coefficients at the top-K centre peaks: a matrix product and a box test,
all with fixed shapes, so the graph takes any batch and returns boxes [N, K, 4], scores
[N, K], labels [N, K] and masks [N, K, H/4, W/4] (probabilities over the model input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.contract import OutputSpec
from training.centernet import CenterNet, CenterNetDetector, _conv_bn_relu, centernet_loss, centre_cells
from training.convnet import ConvNet, Normalize

PROTOTYPES = 16  # YOLACT uses 32 for COCO's 80 classes; 16 suffice for a handful of shapes


class InstanceCenterNet(CenterNet):
    """CenterNet with YOLACT's mask coefficients and prototypes; :meth:`forward` gives five raw
    maps, :meth:`decode` the fixed-shape detections with masks."""

    def __init__(self, num_classes: int, backbone: str = "mobilenet_v3_small", width_mult: float = 1.0,
                 channels: int = 64, max_detections: int = 50, prototypes: int = PROTOTYPES) -> None:
        super().__init__(num_classes, backbone, width_mult, channels, max_detections)
        self.prototypes = prototypes
        self.coef = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, prototypes, 1))
        self.proto = nn.Sequential(_conv_bn_relu(channels, channels),
                                   nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                   _conv_bn_relu(channels, channels), nn.Conv2d(channels, prototypes, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """x: normalised float NCHW -> (heatmap logits, log-size, offset, coefficients [N,M,h,w],
        prototypes [N,M,2h,2w])."""
        p = self.feature_map(x)
        return self.heatmap(p), self.size(p), self.offset(p), self.coef(p), self.proto(p)

    def decode(self, heat_logits: torch.Tensor, log_size: torch.Tensor, offset: torch.Tensor,
               coef: torch.Tensor, proto: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(boxes [N,K,4], scores [N,K], labels [N,K], masks [N,K,H/4,W/4]) in input pixels."""
        peaks = self.peaks(heat_logits)
        boxes, scores, labels = self.boxes_at(peaks, log_size, offset)
        n, m, k = coef.shape[0], coef.shape[1], scores.shape[1]
        at = coef.flatten(2).gather(2, peaks.pix.unsqueeze(1).expand(-1, m, -1))  # [N, M, K]
        ph, pw = proto.shape[-2:]
        logits = torch.bmm(at.transpose(1, 2), proto.flatten(2)).view(n, k, ph, pw)
        return boxes, scores, labels, torch.sigmoid(logits) * box_window(boxes, ph, pw, self.stride / 2)


def box_window(boxes: torch.Tensor, h: int, w: int, cell: float) -> torch.Tensor:
    """[N, K, h, w]: 1 where a grid cell's centre (cells of ``cell`` input pixels) lies inside
    the detection's box [N, K, 4], else 0 (YOLACT's crop, with fixed shapes)."""
    ys = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) * cell
    xs = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) * cell
    b = boxes.unsqueeze(-1).unsqueeze(-1)  # [N, K, 4, 1, 1]
    inside_x = (xs.view(1, 1, 1, w) >= b[:, :, 0]) & (xs.view(1, 1, 1, w) <= b[:, :, 2])
    inside_y = (ys.view(1, 1, h, 1) >= b[:, :, 1]) & (ys.view(1, 1, h, 1) <= b[:, :, 3])
    return (inside_x & inside_y).to(boxes.dtype)


def instance_loss(outputs: tuple[torch.Tensor, ...], targets: list[dict[str, torch.Tensor]], num_classes: int,
                  stride: int = 8) -> torch.Tensor:
    """CenterNet's box loss + each object's mask BCE against its ground truth (area-downsampled
    to the prototypes' grid) inside its box, averaged over the box's cells, then over objects."""
    heat_logits, log_size, offset, coef, proto = outputs
    h, w = heat_logits.shape[-2:]
    ph, pw = proto.shape[-2:]
    loss = centernet_loss((heat_logits, log_size, offset), targets, num_classes, stride)
    cells = list(centre_cells(targets, h, w, stride))
    if not cells:
        return loss + 0.0 * (coef.sum() + proto.sum())
    small = [F.interpolate(t["masks"][None].float(), size=(ph, pw), mode="area")[0] if len(t["masks"]) else None
             for t in targets]  # [K, ph, pw] per image: the fraction of each cell the object covers
    b_idx = torch.tensor([c[0] for c in cells], device=coef.device)
    iy = torch.tensor([c[4] for c in cells], device=coef.device)
    ix = torch.tensor([c[3] for c in cells], device=coef.device)
    gt = torch.stack([small[b][j] for b, j, *_ in cells]).to(coef.device)  # [O, ph, pw]
    at = coef[b_idx, :, iy, ix]  # [O, M]
    logits = torch.einsum("om,omhw->ohw", at, proto[b_idx])
    scale = ph / h  # prototype cells per stride-8 cell
    boxes = torch.tensor([c[2] for c in cells], device=coef.device, dtype=coef.dtype) * scale  # in proto cells
    crop = box_window(boxes.unsqueeze(0), ph, pw, 1.0)[0]  # [O, ph, pw]
    bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none") * crop
    return loss + (bce.sum(dim=(1, 2)) / crop.sum(dim=(1, 2)).clamp(min=1.0)).mean()


class CenterNetInstances(CenterNetDetector):
    """An InstanceCenterNet behind the ConvNet interface: uint8 NHWC in; batchable export of
    boxes, scores, labels and masks."""

    output_spec = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels", masks="masks",
                             max_detections=50, nms_in_graph=True)
    # A CenterNet detector's checkpoint (--weights) brings the backbone, FPN and box heads; the
    # class heatmap and the mask branches start fresh (or alone train, with --freeze backbone).
    last_layers = ("heatmap.", "coef.", "proto.")

    def __init__(self, num_classes: int, backbone: str = "mobilenet_v3_small", width_mult: float = 1.0) -> None:
        ConvNet.__init__(self)
        self.normalize = Normalize()
        self.core = InstanceCenterNet(num_classes, backbone, width_mult,
                                      max_detections=self.output_spec.max_detections or 50)

    def loss(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return instance_loss(self(images), targets, self.core.num_classes, self.core.stride)
