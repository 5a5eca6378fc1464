"""Metrics on NumPy arrays; core.evaluation uses them for training-time validation and
for scoring an exported ONNX file alike.

Classification: top-k accuracy. Segmentation: confusion-matrix IoU per class and mIoU (mean
over all classes, background included, as torchvision's references do). Detection: COCO
mAP@[.5:.95] and mAP@.5 computed by pycocotools, never by hand. Similarity (embeddings):
leave-one-out retrieval, recall@k and mAP@R (Musgrave et al., "A Metric Learning Reality
Check", 2020), as pytorch-metric-learning's AccuracyCalculator computes them (a test compares
the two); written here in NumPy because evaluation and serving load no torch.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np


def topk_correct(scores: np.ndarray, targets: np.ndarray, k: int) -> int:
    """How many rows of ``scores`` [N, C] have their target among the k highest."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return int((top == targets[:, None]).any(axis=1).sum())


class ClassificationMeter:
    def __init__(self, num_classes: int) -> None:
        self.num_classes, self.n, self.top1, self.top5 = num_classes, 0, 0, 0

    def update(self, scores: np.ndarray, targets: np.ndarray) -> None:
        self.n += len(targets)
        self.top1 += topk_correct(scores, targets, 1)
        self.top5 += topk_correct(scores, targets, 5)

    def compute(self) -> dict[str, float]:
        out = {"top1": self.top1 / max(self.n, 1), "images": self.n}
        if self.num_classes > 5:
            out["top5"] = self.top5 / max(self.n, 1)
        return out


class ConfusionMatrix:
    """Pixel confusion matrix for semantic segmentation; ``ignore_index`` pixels are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        keep = target != self.ignore_index
        idx = target[keep].astype(np.int64) * self.num_classes + pred[keep].astype(np.int64)
        self.mat += np.bincount(idx, minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)

    def compute(self, class_names: list[str] | None = None) -> dict[str, Any]:
        tp = np.diag(self.mat).astype(np.float64)
        union = self.mat.sum(0) + self.mat.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / union
        names = class_names or [str(i) for i in range(self.num_classes)]
        present = union > 0
        return {
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": float(tp.sum() / max(self.mat.sum(), 1)),
            "iou": {n: (float(v) if p else None) for n, v, p in zip(names, iou, present)},
        }


RETRIEVAL_CHUNK = 1024  # queries scored at once: a [chunk, N] similarity block


def retrieval_metrics(embeddings: np.ndarray, identities: np.ndarray, ks: tuple[int, ...] = (1, 5)
                      ) -> dict[str, float | int]:
    """Leave-one-out retrieval over a held-out set: each image queries all the others, ranked
    by cosine similarity (rows are L2-normalised here; ties go to the earlier image).

    ``recall_at_k``: the share of queries with an image of their own identity among their k
    nearest. ``map_at_r``: mean average precision at R, R the number of other images of the
    query's identity: the precision at each of the first R ranks that holds a match, summed
    and divided by R (1.0 only when all R come first). Queries whose identity has no other
    image are left out and counted in ``queries`` no more."""
    x = np.asarray(embeddings, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    ids = np.asarray(identities)
    n = len(x)
    counts = {i: c for i, c in zip(*np.unique(ids, return_counts=True))}
    r_of = np.array([counts[i] - 1 for i in ids]) if n else np.zeros(0, int)
    hits = dict.fromkeys(ks, 0)
    ap_sum, queries = 0.0, 0
    r_max = int(r_of.max(initial=0))
    depth = min(max(max(ks), r_max), max(n - 1, 0))
    for start in range(0, n, RETRIEVAL_CHUNK):
        rows = np.arange(start, min(start + RETRIEVAL_CHUNK, n))
        sim = x[rows] @ x.T
        sim[np.arange(len(rows)), rows] = -np.inf  # never the query itself
        order = np.argsort(-sim, axis=1, kind="stable")[:, :depth]
        match = ids[order] == ids[rows][:, None]
        for j, q in enumerate(rows):
            r = int(r_of[q])
            if r == 0:
                continue
            queries += 1
            for k in ks:
                hits[k] += bool(match[j, :k].any())
            rel = match[j, :r]
            precision = np.cumsum(rel) / np.arange(1, r + 1)
            ap_sum += float((precision * rel).sum()) / r
    out: dict[str, float | int] = {f"recall_at_{k}": hits[k] / max(queries, 1) for k in ks}
    out["map_at_r"] = ap_sum / max(queries, 1)
    out["queries"] = queries
    return out


def _coco_stats(coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int] | None, iou_type: str,
                sigmas: list[float] | None = None) -> list[float]:
    """pycocotools' COCOeval summary (its ``stats``) of ``results`` for ``iou_type``."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, iou_type)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def coco_detection_metrics(coco_gt: Any, detections: list[dict[str, Any]],
                           image_ids: list[int] | None = None) -> dict[str, float]:
    """COCO box mAP with pycocotools. ``detections``: dicts with image_id, category_id,
    bbox [x, y, w, h] in original pixels, score. ``coco_gt``: a pycocotools COCO object.
    ``image_ids``: score these images only (default: every image in ``coco_gt``)."""
    if not detections:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "detections": 0}
    s = _coco_stats(coco_gt, detections, image_ids, "bbox")
    return {"map": s[0], "map_50": s[1], "map_75": s[2], "detections": len(detections)}


def coco_mask_metrics(coco_gt: Any, results: list[dict[str, Any]],
                      image_ids: list[int] | None = None) -> dict[str, float]:
    """COCO mask AP (pycocotools' ``segm``). ``results``: dicts with image_id, category_id,
    segmentation (COCO RLE at the original size), score."""
    if not results:
        return {"mask_ap": 0.0, "mask_ap_50": 0.0, "mask_ap_75": 0.0, "instances": 0}
    s = _coco_stats(coco_gt, results, image_ids, "segm")
    return {"mask_ap": s[0], "mask_ap_50": s[1], "mask_ap_75": s[2], "instances": len(results)}


def coco_keypoint_metrics(coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int] | None,
                          sigmas: list[float]) -> dict[str, float]:
    """COCO keypoint AP by object keypoint similarity (pycocotools' ``keypoints``) with one
    OKS ``sigma`` per keypoint (COCO's 17 are pycocotools' default; other skeletons carry
    their own). ``results``: dicts with image_id, category_id, keypoints [x, y, v] x K in
    original pixels, score."""
    if not results:
        return {"oks_ap": 0.0, "oks_ap_50": 0.0, "oks_ap_75": 0.0, "instances": 0}
    s = _coco_stats(coco_gt, results, image_ids, "keypoints", sigmas)
    return {"oks_ap": s[0], "oks_ap_50": s[1], "oks_ap_75": s[2], "instances": len(results)}


def load_coco(path: str) -> Any:
    """A pycocotools COCO object for an annotations file, without its console chatter."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)
