"""ONNX Runtime vs PyTorch on real images: the export fails when they disagree.

Tolerances (stated, not tuned to pass):
- classification: every logit within 1e-3 + 1e-3*|logit|, and identical top-1;
- segmentation: every mask logit within 1e-3 + 1e-3*|logit|, argmax equal on >= 99.9% pixels;
- detection: the sorted top-K score vectors agree within 1e-4 (above the K-th score), and at least 98% of the
  detections with score >= 0.05 have a twin in the other runtime (same label, IoU >= 0.99,
  score within 1e-3), both ways. Not 100%: a heatmap peak is "equal to its 3x3 max", and on
  a plateau a 1e-8 rounding difference moves a peak by one cell; detections within 1e-3 of
  the other runtime's K-th score are not compared (ties fall either side of the top-K cut).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.contract import ModelContract
from service.preprocess import prepare
from service.runtime import create_session
from training.datasets import IMAGE_SUFFIXES

ATOL, RTOL = 1e-3, 1e-3


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree beyond the stated tolerance."""


def sample_batch(data: Path, contract: ModelContract, count: int) -> np.ndarray:
    """Up to ``count`` real images found under ``data``, prepared as the service prepares them."""
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "masks" not in p.parts)
    if not files:
        raise ParityError(f"no images under {data} for the parity check")
    step = max(1, len(files) // count)
    batch = []
    for p in files[::step][:count]:
        with Image.open(p) as im:
            arr, _ = prepare(im.convert("RGB"), contract.input.width, contract.input.height,
                             contract.input.resize, contract.input.pad_value)
        batch.append(arr)
    return np.stack(batch)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _unmatched(src: tuple[np.ndarray, ...], dst: tuple[np.ndarray, ...], thr: float) -> int:
    """How many of src's detections above thr find no twin in dst (same label, IoU, score)."""
    (sb, ss, sl), (db, ds, dl) = src, dst
    if len(ds) == 0:
        return int((ss >= thr).sum())
    # Near the top-K cut-off, equal scores may be kept by one runtime and cut by the other.
    keep = (ss >= thr) & (ss > ds.min() + 1e-3)
    if not keep.any():
        return 0
    iou = _box_iou(sb[keep], db)
    ok = (iou >= 0.99) & (sl[keep][:, None] == dl[None, :]) & (np.abs(ss[keep][:, None] - ds[None, :]) <= 1e-3)
    return int((~ok.any(axis=1)).sum())


def check_parity(module: torch.nn.Module, onnx_path: Path, contract: ModelContract, data: Path,
                 count: int = 16) -> dict[str, Any]:
    """Compare ``module`` and the ONNX file on real images; raises ParityError, returns a report."""
    batch = sample_batch(data, contract, count)
    sess = create_session(onnx_path, "cpu", threads=2)
    names = contract.outputs.tensor_names()

    def torch_run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]

    report: dict[str, Any] = {"images": int(len(batch)), "atol": ATOL, "rtol": RTOL}
    if contract.task in ("classification", "segmentation"):
        r, g = torch_run(batch)[0], sess.run(names, {contract.input.name: batch})[0]
        diff = float(np.abs(r - g).max())
        report["max_abs_diff"] = diff
        if not np.allclose(g, r, atol=ATOL, rtol=RTOL):
            raise ParityError(f"{contract.task} outputs differ by up to {diff:.3g}")
        agree = float((r.argmax(1) == g.argmax(1)).mean())
        report["argmax_agreement"] = agree
        need = 1.0 if contract.task == "classification" else 0.999
        if agree < need:
            raise ParityError(f"argmax agrees on {agree:.4%} only (need {need:.1%})")
        return report
    # Detection: per image (boxes, scores, labels) from each runtime; fixed-batch graphs
    # (torchvision's, one image per call) run image by image.
    if contract.batch.dynamic:
        r_all, g_all = torch_run(batch), sess.run(names, {contract.input.name: batch})
        pairs = [(tuple(x[i] for x in r_all), tuple(x[i] for x in g_all)) for i in range(len(batch))]
    else:
        pairs = [(tuple(torch_run(batch[i:i + 1])), tuple(sess.run(names, {contract.input.name: batch[i:i + 1]})))
                 for i in range(len(batch))]
    score_diff, missing, compared = 0.0, 0, 0
    for t, o in pairs:
        rs, gs = -np.sort(-t[1]), -np.sort(-o[1])
        k = min(len(rs), len(gs))
        if k:
            floor = max(rs[k - 1], gs[k - 1]) + 1e-3
            above = rs[:k] > floor
            score_diff = max(score_diff, float((np.abs(rs[:k] - gs[:k]) * above).max()))
        missing += _unmatched(t, o, 0.05) + _unmatched(o, t, 0.05)
        compared += int((t[1] >= 0.05).sum()) + int((o[1] >= 0.05).sum())
    report.update(sorted_score_max_diff=score_diff, unmatched_detections=missing, detections_compared=compared)
    if score_diff > 1e-4:
        raise ParityError(f"top-K scores differ by up to {score_diff:.3g}")
    if missing > 0.02 * compared:
        raise ParityError(f"{missing} of {compared} detections (score >= 0.05) have no twin between PyTorch and ONNX")
    return report
