"""A batchable keypoint detector: CenterNet's pose variant ("Objects as Points", Zhou et al.
2019, section 4.3), on training.centernet's backbone, FPN and box heads.

Besides the centre heatmap, box size and centre offset, two heads on the same stride-8 map:
``kp_offset`` [N, 2P, h, w], each keypoint's position relative to the object's centre cell
(in cells), ``kp_visible`` [N, P, h, w], the logit that the keypoint is visible, and, as the
paper refines regressed joints, ``kp_heat`` [N, P, h, w] (a heatmap per keypoint) with a
shared sub-cell offset. Decoding reads the first two at the top-K centre peaks and moves each
regressed keypoint to the nearest peak of its heatmap inside its object's box, all with fixed
shapes, so the graph takes any batch: boxes [N, K, 4], scores [N, K], labels [N, K] and
keypoints [N, K, P, 3] (x, y in input pixels and the keypoint's confidence: visibility times
the object's score).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.contract import KeypointSpec, OutputSpec
from training.centernet import CenterNet, CenterNetDetector, _conv_bn_relu, centernet_loss, centre_cells, focal_loss
from training.convnet import ConvNet, Normalize

SNAP_SCORE = 0.1  # a keypoint heatmap peak weaker than this never moves a regressed keypoint


class PoseCenterNet(CenterNet):
    """CenterNet with keypoint heads; :meth:`forward` gives five raw maps, :meth:`decode`
    the fixed-shape detections with keypoints."""

    def __init__(self, num_classes: int, num_keypoints: int, backbone: str = "mobilenet_v3_small",
                 width_mult: float = 1.0, channels: int = 64, max_detections: int = 100) -> None:
        super().__init__(num_classes, backbone, width_mult, channels, max_detections)
        self.num_keypoints = num_keypoints
        self.kp_offset = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, 2 * num_keypoints, 1))
        self.kp_visible = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, num_keypoints, 1))
        self.kp_heat = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, num_keypoints, 1))
        self.kp_heat_offset = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, 2, 1))
        nn.init.constant_(self.kp_heat[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """x: normalised float NCHW -> (heatmap logits, log-size, offset, kp offsets, kp visibility
        logits, per-keypoint heatmap logits, their sub-cell offset)."""
        p = self.feature_map(x)
        return (self.heatmap(p), self.size(p), self.offset(p), self.kp_offset(p), self.kp_visible(p), self.kp_heat(p),
                self.kp_heat_offset(p))

    def decode(self, heat_logits: torch.Tensor, log_size: torch.Tensor, offset: torch.Tensor,
               kp_offset: torch.Tensor, kp_visible: torch.Tensor, kp_heat: torch.Tensor, kp_heat_offset: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(boxes [N,K,4], scores [N,K], labels [N,K], keypoints [N,K,P,3]) in input pixels."""
        peaks = self.peaks(heat_logits)
        boxes, scores, labels = self.boxes_at(peaks, log_size, offset)
        n, k, p = scores.shape[0], scores.shape[1], self.num_keypoints
        at = peaks.pix.unsqueeze(1)
        rel = kp_offset.flatten(2).gather(2, at.expand(-1, 2 * p, -1)).view(n, p, 2, k)
        xs = (peaks.xs.to(rel.dtype).unsqueeze(1) + rel[:, :, 0]) * self.stride  # [N, P, K]
        ys = (peaks.ys.to(rel.dtype).unsqueeze(1) + rel[:, :, 1]) * self.stride
        xs, ys = self._snap(xs, ys, boxes, kp_heat, kp_heat_offset)
        visible = torch.sigmoid(kp_visible.flatten(2).gather(2, at.expand(-1, p, -1)))  # [N, P, K]
        keypoints = torch.stack([xs, ys, visible * scores.unsqueeze(1)], dim=-1).permute(0, 2, 1, 3)
        return boxes, scores, labels, keypoints

    def _snap(self, xs: torch.Tensor, ys: torch.Tensor, boxes: torch.Tensor, kp_heat: torch.Tensor,
              kp_heat_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's refinement: each regressed keypoint [N, P, K] moves to the nearest peak of
        its keypoint's heatmap (top-K peaks per keypoint, score >= SNAP_SCORE) inside its
        object's box; with none there it stays where it was regressed."""
        heat = torch.sigmoid(kp_heat)
        n, p, h, w = heat.shape
        k = xs.shape[-1]
        peak = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
        score, idx = peak.flatten(2).topk(k, dim=2)  # [N, P, M], M = K
        row = torch.div(idx, w, rounding_mode="floor")
        off = kp_heat_offset.flatten(2)  # [N, 2, h*w]
        flat = idx.flatten(1)
        px = (idx - row * w).to(xs.dtype) + off[:, 0].gather(1, flat).view(n, p, k)
        py = row.to(xs.dtype) + off[:, 1].gather(1, flat).view(n, p, k)
        px, py = px * self.stride, py * self.stride  # [N, P, M]
        dist = (xs.unsqueeze(-1) - px.unsqueeze(2)) ** 2 + (ys.unsqueeze(-1) - py.unsqueeze(2)) ** 2  # [N,P,K,M]
        b = boxes.unsqueeze(1).unsqueeze(3)  # [N, 1, K, 1, 4]
        inside = ((px.unsqueeze(2) >= b[..., 0]) & (px.unsqueeze(2) <= b[..., 2]) & (py.unsqueeze(2) >= b[..., 1])
                  & (py.unsqueeze(2) <= b[..., 3]) & (score.unsqueeze(2) >= SNAP_SCORE))
        dist = torch.where(inside, dist, torch.full_like(dist, 1e12))
        best, choice = dist.min(dim=-1)  # [N, P, K]
        use = best < 1e12
        return (torch.where(use, px.gather(2, choice), xs), torch.where(use, py.gather(2, choice), ys))


def pose_targets(targets: list[dict[str, torch.Tensor]], num_keypoints: int, out_h: int, out_w: int, stride: int
                 ) -> tuple[torch.Tensor, ...]:
    """At each object's centre cell (build_targets' cell): its keypoints relative to the cell,
    in cells [N, 2P, h, w], which of them are labelled [N, P, h, w], and which visible; and for
    the keypoint heatmaps: a Gaussian per labelled keypoint [N, P, h, w] (its sigma a tenth of
    the object's shorter side, at least half a cell), the sub-cell offset at its cell
    [N, 2, h, w] and where that offset is known [N, 1, h, w]."""
    n = len(targets)
    rel = torch.zeros(n, 2 * num_keypoints, out_h, out_w)
    labelled = torch.zeros(n, num_keypoints, out_h, out_w)
    visible = torch.zeros(n, num_keypoints, out_h, out_w)
    heat = torch.zeros(n, num_keypoints, out_h, out_w)
    heat_off = torch.zeros(n, 2, out_h, out_w)
    heat_mask = torch.zeros(n, 1, out_h, out_w)
    ys = torch.arange(out_h, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(out_w, dtype=torch.float32).view(1, -1)
    for b, j, (x1, y1, x2, y2), ix, iy in centre_cells(targets, out_h, out_w, stride):  # build_targets' cells
        kp = targets[b]["keypoints"][j]  # [P, 3], input pixels
        known = (kp[:, 2] > 0).float()
        rel[b, 0::2, iy, ix] = (kp[:, 0] / stride - ix) * known
        rel[b, 1::2, iy, ix] = (kp[:, 1] / stride - iy) * known
        labelled[b, :, iy, ix] = known
        visible[b, :, iy, ix] = (kp[:, 2] == 2).float()
        sigma = max(0.1 * min(x2 - x1, y2 - y1), 0.5)
        for p in torch.nonzero(known).flatten().tolist():
            kx, ky = (kp[p, 0] / stride).item(), (kp[p, 1] / stride).item()
            jx, jy = min(max(int(kx), 0), out_w - 1), min(max(int(ky), 0), out_h - 1)
            g = torch.exp(-((xs - jx) ** 2 + (ys - jy) ** 2) / (2 * sigma * sigma))
            heat[b, p] = torch.maximum(heat[b, p], g)
            heat[b, p, jy, jx] = 1.0
            heat_off[b, :, jy, jx] = torch.tensor([kx - jx, ky - jy])
            heat_mask[b, 0, jy, jx] = 1.0
    return rel, labelled, visible, heat, heat_off, heat_mask


def pose_loss(outputs: tuple[torch.Tensor, ...], targets: list[dict[str, torch.Tensor]], num_classes: int,
              num_keypoints: int, stride: int = 8) -> torch.Tensor:
    """CenterNet's box loss + L1 on labelled keypoints' offsets + BCE on their visibility, at
    the object centres."""
    heat_logits, log_size, offset, kp_offset, kp_visible, kp_heat, kp_heat_offset = outputs
    h, w = heat_logits.shape[-2:]
    rel, labelled, visible, heat, heat_off, heat_mask = (
        t.to(heat_logits.device) for t in pose_targets(targets, num_keypoints, h, w, stride))
    denom = labelled.sum().clamp(min=1.0)
    weight = labelled.repeat_interleave(2, dim=1)
    kp_l1 = (F.l1_loss(kp_offset, rel, reduction="none") * weight).sum() / denom
    vis_bce = (F.binary_cross_entropy_with_logits(kp_visible, visible, reduction="none") * labelled).sum() / denom
    heat_l1 = (F.l1_loss(kp_heat_offset, heat_off, reduction="none") * heat_mask).sum() / heat_mask.sum().clamp(min=1)
    return (centernet_loss((heat_logits, log_size, offset), targets, num_classes, stride) + kp_l1 + 0.5 * vis_bce
            + focal_loss(kp_heat, heat) + heat_l1)


class CenterNetPose(CenterNetDetector):
    """A PoseCenterNet behind the ConvNet interface: uint8 NHWC in; batchable export of boxes,
    scores, labels and keypoints. ``keypoints`` (names, skeleton, OKS sigmas) comes from the
    training data and goes into the exported contract."""

    output_spec = OutputSpec(kind="boxes", boxes="boxes", scores="scores", labels="labels", keypoints="keypoints",
                             max_detections=20, nms_in_graph=True)
    # Sized by the classes or the keypoints: a CenterNet detector's checkpoint (--weights) brings
    # the backbone, FPN and box heads; these start fresh (or alone train, with --freeze backbone).
    last_layers = ("heatmap.", "kp_offset.", "kp_visible.", "kp_heat.", "kp_heat_offset.")

    def __init__(self, num_classes: int, keypoints: KeypointSpec, backbone: str = "mobilenet_v3_small",
                 width_mult: float = 1.0) -> None:
        ConvNet.__init__(self)
        self.keypoint_spec = keypoints
        self.normalize = Normalize()
        self.core = PoseCenterNet(num_classes, len(keypoints.names), backbone, width_mult,
                                  max_detections=self.output_spec.max_detections or 20)

    def loss(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return pose_loss(self(images), targets, self.core.num_classes, self.core.num_keypoints, self.core.stride)
