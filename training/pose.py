"""A batchable keypoint detector: CenterNet's pose variant ("Objects as Points", Zhou et al.
2019, section 4.3), on training.centernet's backbone, FPN and box heads.

Besides the centre heatmap, box size and centre offset, two heads on the same stride-8 map:
``kp_offset`` [N, 2P, h, w], each keypoint's position relative to the object's centre cell
(in cells), and ``kp_visible`` [N, P, h, w], the logit that the keypoint is visible. Decoding
reads both at the top-K centre peaks, so the graph keeps CenterNet's fixed shapes and takes
any batch: boxes [N, K, 4], scores [N, K], labels [N, K] and keypoints [N, K, P, 3] (x, y in
input pixels and the keypoint's confidence: visibility times the object's score). The paper
refines regressed joints with per-joint heatmaps; this version regresses only (a later step
if the scores ask for it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.centernet import CenterNet, _conv_bn_relu, centernet_loss


class PoseCenterNet(CenterNet):
    """CenterNet with keypoint heads; :meth:`forward` gives five raw maps, :meth:`decode_pose`
    the fixed-shape detections with keypoints."""

    def __init__(self, num_classes: int, num_keypoints: int, backbone: str = "mobilenet_v3_small",
                 width_mult: float = 1.0, channels: int = 64, max_detections: int = 100) -> None:
        super().__init__(num_classes, backbone, width_mult, channels, max_detections)
        self.num_keypoints = num_keypoints
        self.kp_offset = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, 2 * num_keypoints, 1))
        self.kp_visible = nn.Sequential(_conv_bn_relu(channels, channels), nn.Conv2d(channels, num_keypoints, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """x: normalised float NCHW -> (heatmap logits, log-size, offset, kp offsets, kp visibility logits)."""
        p = self.feature_map(x)
        return self.heatmap(p), self.size(p), self.offset(p), self.kp_offset(p), self.kp_visible(p)

    def decode_pose(self, heat_logits: torch.Tensor, log_size: torch.Tensor, offset: torch.Tensor,
                    kp_offset: torch.Tensor, kp_visible: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(boxes [N,K,4], scores [N,K], labels [N,K], keypoints [N,K,P,3]) in input pixels."""
        peaks = self.peaks(heat_logits)
        boxes, scores, labels = self.boxes_at(peaks, log_size, offset)
        n, k, p = scores.shape[0], scores.shape[1], self.num_keypoints
        at = peaks.pix.unsqueeze(1)
        rel = kp_offset.flatten(2).gather(2, at.expand(-1, 2 * p, -1)).view(n, p, 2, k)
        xs = (peaks.xs.to(rel.dtype).unsqueeze(1) + rel[:, :, 0]) * self.stride  # [N, P, K]
        ys = (peaks.ys.to(rel.dtype).unsqueeze(1) + rel[:, :, 1]) * self.stride
        visible = torch.sigmoid(kp_visible.flatten(2).gather(2, at.expand(-1, p, -1)))  # [N, P, K]
        keypoints = torch.stack([xs, ys, visible * scores.unsqueeze(1)], dim=-1).permute(0, 2, 1, 3)
        return boxes, scores, labels, keypoints


def pose_targets(targets: list[dict[str, torch.Tensor]], num_keypoints: int, out_h: int, out_w: int, stride: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At each object's centre cell (build_targets' cell): its keypoints relative to the cell,
    in cells [N, 2P, h, w], which of them are labelled [N, P, h, w], and which visible."""
    n = len(targets)
    rel = torch.zeros(n, 2 * num_keypoints, out_h, out_w)
    labelled = torch.zeros(n, num_keypoints, out_h, out_w)
    visible = torch.zeros(n, num_keypoints, out_h, out_w)
    for b, t in enumerate(targets):
        boxes = t["boxes"] / stride
        order = torch.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), descending=True)
        for j in order.tolist():  # larger first, as build_targets: the smaller object keeps a shared cell
            x1, y1, x2, y2 = boxes[j].tolist()
            if x2 <= x1 or y2 <= y1:
                continue
            ix, iy = min(int((x1 + x2) / 2), out_w - 1), min(int((y1 + y2) / 2), out_h - 1)
            kp = t["keypoints"][j]  # [P, 3], input pixels
            known = (kp[:, 2] > 0).float()
            rel[b, 0::2, iy, ix] = (kp[:, 0] / stride - ix) * known
            rel[b, 1::2, iy, ix] = (kp[:, 1] / stride - iy) * known
            labelled[b, :, iy, ix] = known
            visible[b, :, iy, ix] = (kp[:, 2] == 2).float()
    return rel, labelled, visible


def pose_loss(outputs: tuple[torch.Tensor, ...], targets: list[dict[str, torch.Tensor]], num_classes: int,
              num_keypoints: int, stride: int = 8) -> torch.Tensor:
    """CenterNet's box loss + L1 on labelled keypoints' offsets + BCE on their visibility, at
    the object centres."""
    heat_logits, log_size, offset, kp_offset, kp_visible = outputs
    h, w = heat_logits.shape[-2:]
    rel, labelled, visible = (t.to(heat_logits.device) for t in pose_targets(targets, num_keypoints, h, w, stride))
    denom = labelled.sum().clamp(min=1.0)
    weight = labelled.repeat_interleave(2, dim=1)
    kp_l1 = (F.l1_loss(kp_offset, rel, reduction="none") * weight).sum() / denom
    vis_bce = (F.binary_cross_entropy_with_logits(kp_visible, visible, reduction="none") * labelled).sum() / denom
    return centernet_loss((heat_logits, log_size, offset), targets, num_classes, stride) + kp_l1 + 0.5 * vis_bce
