"""A batchable anchor-free detector: CenterNet ("Objects as Points", Zhou et al. 2019).

Why this design: a CenterNet head predicts a per-class centre heatmap, box size and centre
offset on one stride-8 feature map. Decoding is a 3x3 max-pool peak test plus a top-k, so
there is no NMS and no data-dependent shape anywhere: the exported ONNX graph takes any
batch of fixed-size images and returns fixed-shape [N, K, 4] boxes, [N, K] scores and
[N, K] labels (K = max_detections; rows below the score threshold are padding the service
drops). torchvision's detectors, by contrast, export with one image per call.

Backbone: torchvision MobileNetV3 features; a small top-down FPN merges strides 32/16/8.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from core.contract import OutputSpec
from training.convnet import ConvNet, Normalize


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Peaks(NamedTuple):
    """The top-K centre peaks of a batch: [N, K] scores, labels, flat cell indices, columns, rows."""

    scores: torch.Tensor
    labels: torch.Tensor
    pix: torch.Tensor
    xs: torch.Tensor
    ys: torch.Tensor


class CenterNet(nn.Module):
    """Training forward returns raw maps; :meth:`decode` (used by the export wrapper) boxes."""

    stride = 8

    def __init__(self, num_classes: int, backbone: str = "mobilenet_v3_small", width_mult: float = 1.0,
                 channels: int = 64, max_detections: int = 100) -> None:
        super().__init__()
        self.num_classes, self.max_detections = num_classes, max_detections
        features = getattr(tvm, backbone)(weights=None, width_mult=width_mult).features
        # The last block at each output stride 8, 16, 32 (found by a dry run, not hard-coded).
        taps: dict[int, int] = {}
        with torch.no_grad():
            x = torch.zeros(1, 3, 64, 64)
            for i, block in enumerate(features):
                x = block(x)
                taps[64 // x.shape[-1]] = i
        self.cuts = [taps[8], taps[16], taps[32]]
        self.features = features
        chans = [self._out_channels(features[i]) for i in self.cuts]
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in chans)
        self.smooth = _conv_bn_relu(channels, channels)
        self.heatmap = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, num_classes, 1))
        self.size = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, 2, 1))
        self.offset = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, 2, 1))
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))

    @staticmethod
    def _out_channels(block: nn.Module) -> int:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: normalised float NCHW -> (heatmap logits [N,C,h,w], log-size [N,2,h,w], offset [N,2,h,w])."""
        p = self.feature_map(x)
        return self.heatmap(p), self.size(p), self.offset(p)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-8 map every head reads: backbone taps at strides 8/16/32 merged top-down."""
        feats = []
        for i, block in enumerate(self.features[: self.cuts[-1] + 1]):
            x = block(x)
            if i in self.cuts:
                feats.append(x)
        p = self.lateral[2](feats[2])
        for level in (1, 0):
            lat = self.lateral[level](feats[level])
            p = lat + F.interpolate(p, size=lat.shape[-2:], mode="nearest")
        return self.smooth(p)

    def decode(self, heat_logits: torch.Tensor, log_size: torch.Tensor, offset: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Peaks -> top-K boxes (xyxy, input pixels), scores and labels, fixed shapes per batch."""
        return self.boxes_at(self.peaks(heat_logits), log_size, offset)

    def peaks(self, heat_logits: torch.Tensor) -> Peaks:
        """The top-K heatmap peaks of each image: scores, labels and cells (fixed shapes)."""
        heat = torch.sigmoid(heat_logits)
        n, c, h, w = heat.shape
        # Tie-break: a fixed pattern that gives the 9 cells of every 3x3 window distinct
        # offsets (<= 1e-4), so plateaus have one peak and rounding differences between
        # runtimes (~1e-8) cannot move it. Scores are read from the unbiased heatmap.
        ys_, xs_ = torch.arange(h, device=heat.device) % 3, torch.arange(w, device=heat.device) % 3
        tie = (xs_.view(1, -1) + 3 * ys_.view(-1, 1)).to(heat.dtype) * (1e-4 / 9)
        biased = heat + tie
        peaks = biased * (F.max_pool2d(biased, 3, stride=1, padding=1) == biased).to(heat.dtype)
        _, idx = peaks.flatten(1).topk(self.max_detections, dim=1)
        scores = heat.flatten(1).gather(1, idx) * (peaks.flatten(1).gather(1, idx) > 0).to(heat.dtype)
        labels = torch.div(idx, h * w, rounding_mode="floor")
        pix = idx - labels * (h * w)
        ys = torch.div(pix, w, rounding_mode="floor")
        xs = pix - ys * w
        return Peaks(scores, labels, pix, xs, ys)

    def boxes_at(self, peaks: Peaks, log_size: torch.Tensor, offset: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes (xyxy, input pixels), scores and labels at ``peaks``."""
        gather = peaks.pix.unsqueeze(1).expand(-1, 2, -1)
        size = log_size.flatten(2).gather(2, gather).clamp(max=8.0).exp() * self.stride
        off = offset.flatten(2).gather(2, gather)
        cx = (peaks.xs.to(off.dtype) + off[:, 0]) * self.stride
        cy = (peaks.ys.to(off.dtype) + off[:, 1]) * self.stride
        boxes = torch.stack([cx - size[:, 0] / 2, cy - size[:, 1] / 2, cx + size[:, 0] / 2, cy + size[:, 1] / 2],
                            dim=-1)
        return boxes, peaks.scores, peaks.labels


class CenterNetDetector(ConvNet):
    """A CenterNet behind the ConvNet interface: uint8 NHWC in; batchable export. Its pose and
    instance variants (training.pose, training.instances) subclass it with their own ``core``
    (a CenterNet whose :meth:`CenterNet.decode` adds their outputs) and loss."""

    output_spec = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels",
                             max_detections=100, nms_in_graph=True)

    def __init__(self, num_classes: int, backbone: str = "mobilenet_v3_small", width_mult: float = 1.0) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.core = CenterNet(num_classes, backbone, width_mult, max_detections=self.output_spec.max_detections or 100)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The core's raw maps (heatmap logits, log-size, offset, then the variant's) for uint8 images."""
        return self.core(self.normalize(x))

    def loss(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return centernet_loss(self(images), targets, self.core.num_classes, self.core.stride)

    def export_module(self) -> nn.Module:
        return CenterNetExport(self)


class CenterNetExport(nn.Module):
    """uint8 NHWC in, (boxes [N,K,4], scores [N,K], labels [N,K], then the variant's masks or
    keypoints) out: the exported graph."""

    def __init__(self, detector: CenterNetDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.detector.core.decode(*self.detector(x))


def build_targets(targets: list[dict[str, torch.Tensor]], num_classes: int, out_h: int, out_w: int,
                  stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian centre heatmaps (TTFNet-style elliptical, alpha 0.54) and size/offset targets.

    Returns heat [N,C,h,w], size [N,2,h,w] (log of box size in cells), offset [N,2,h,w],
    and a [N,1,h,w] mask of the centre cells that carry a size/offset target.
    """
    n = len(targets)
    heat = torch.zeros(n, num_classes, out_h, out_w)
    size = torch.zeros(n, 2, out_h, out_w)
    off = torch.zeros(n, 2, out_h, out_w)
    mask = torch.zeros(n, 1, out_h, out_w)
    ys = torch.arange(out_h, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(out_w, dtype=torch.float32).view(1, -1)
    for b, j, (x1, y1, x2, y2), ix, iy in centre_cells(targets, out_h, out_w, stride):
        bw, bh = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        sx, sy = max(0.54 * bw / 6, 0.3), max(0.54 * bh / 6, 0.3)
        g = torch.exp(-((xs - ix) ** 2) / (2 * sx * sx) - ((ys - iy) ** 2) / (2 * sy * sy))
        c = int(targets[b]["labels"][j])
        heat[b, c] = torch.maximum(heat[b, c], g)
        heat[b, c, iy, ix] = 1.0
        size[b, :, iy, ix] = torch.tensor([math.log(bw), math.log(bh)])
        off[b, :, iy, ix] = torch.tensor([cx - ix, cy - iy])
        mask[b, 0, iy, ix] = 1.0
    return heat, size, off, mask


def centre_cells(targets: list[dict[str, torch.Tensor]], out_h: int, out_w: int, stride: int
                 ) -> Iterator[tuple[int, int, tuple[float, float, float, float], int, int]]:
    """Where each object's targets go: (image, object, its box in cells, centre column, centre
    row), larger boxes first so that a smaller object wins a cell it shares; empty boxes left out.
    Every head trained at the centres (boxes here, keypoints in training.pose) uses this walk."""
    for b, t in enumerate(targets):
        boxes = t["boxes"] / stride
        order = torch.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), descending=True)
        for j in order.tolist():
            x1, y1, x2, y2 = boxes[j].tolist()
            if x2 <= x1 or y2 <= y1:
                continue
            yield b, j, (x1, y1, x2, y2), min(int((x1 + x2) / 2), out_w - 1), min(int((y1 + y2) / 2), out_h - 1)


def focal_loss(heat_logits: torch.Tensor, t_heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss of heatmap logits against Gaussian targets (1 at peaks)."""
    pred = torch.sigmoid(heat_logits).clamp(1e-4, 1 - 1e-4)
    pos = t_heat.eq(1).float()
    neg_weight = (1 - t_heat) ** 4
    pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred ** 2 * neg_weight * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def centernet_loss(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   targets: list[dict[str, torch.Tensor]], num_classes: int, stride: int = 8) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss + L1 on log-size and offset at centres."""
    heat_logits, log_size, offset = outputs
    h, w = heat_logits.shape[-2:]
    t_heat, t_size, t_off, mask = (t.to(heat_logits.device) for t in build_targets(targets, num_classes, h, w, stride))
    focal = focal_loss(heat_logits, t_heat)
    denom = mask.sum().clamp(min=1.0)
    size_l1 = (F.l1_loss(log_size, t_size, reduction="none") * mask).sum() / denom
    off_l1 = (F.l1_loss(offset, t_off, reduction="none") * mask).sum() / denom
    return focal + size_l1 + off_l1
