"""ONNX Runtime vs PyTorch on real images: the export fails when they disagree.

Both runtimes are fed the same images, loaded by core.imaging.load_input as the service
loads requests, and both answers are split per image by core.tasks, so the comparison is
the same for dynamic, fixed-batch and one-image-per-call graphs.

Tolerances and why. PyTorch and ONNX Runtime compute the same float32 arithmetic in a
different order: each runtime's convolution kernels block and vectorise the sums
differently, and the vector width differs between CPUs (8 lanes with AVX2, 16 with
AVX512), so the rounding differs. The difference grows with depth and with the size of the
values. Measured: up to 1.5e-4 on the scores of the barely trained test detector on an
AVX512 EPYC (a flat 1e-4 bound failed there), 1e-7 for the same model on an AVX512 Xeon,
and at most 2e-5 on the shipped models' logits. ATOL = RTOL = 1e-3 leaves more than 6x the
worst of these on either kind of CPU, while a real export fault (a missing layer, no
normalisation, other weights: tests/export perturbs the weights) moves outputs by 1e-2 to 1e0.

- classification: every logit within ATOL + RTOL*|logit|, and identical top-1 for every image;
  the extra outputs (embedding, class activation maps), when exported, within the same bound;
- segmentation: every mask logit within the same bound, argmax equal on >= 99.9% of pixels
  (a pixel whose two best classes tie within the bound may flip);
- detection: scores are sigmoids of heatmap logits (slope <= 1/4), so the same bound holds
  for them: each image's sorted score vector agrees within it, and at least 98% of the
  detections scoring >= 0.05 have a twin in the other runtime (same label, IoU >= 0.99,
  score within the bound), both ways. Not 100%: a CenterNet peak is "equal to its 3x3
  maximum", and rounding on a plateau may move a peak by one cell; detections within 1e-3
  of either runtime's K-th score are not compared (ties fall either side of the top-K cut).
- instance_segmentation: the detections as above; the masks of twin detections within the
  bound on >= 99.9% of their cells (a cell on the edge of a box that moved by rounding may
  fall either side of the crop).
- keypoints: the detections as above; the keypoints of twin detections within 0.05 input
  pixels (and the confidence within the bound) on >= 99% of keypoints: a keypoint moves to
  the nearest peak of its heatmap, and two peaks at equal distance may go either way.
- embedding: every component within the bound, each image's two vectors at cosine >= 0.9999,
  and each image's nearest neighbour among the batch the same (up to a tie within 1e-4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.contract import ModelContract
from core.imaging import load_input
from core.runtime import OnnxModel
from core.tasks import TASKS, Outputs
from training.graph import predictor
from training.models import ConvNet

ATOL, RTOL = 1e-3, 1e-3


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree beyond the stated tolerance."""


def sample_batch(data: Path, contract: ModelContract, count: int) -> np.ndarray:
    """Up to ``count`` images of the dataset at ``data``, evenly spaced, loaded as the service loads them."""
    samples = TASKS[contract.task].read_dataset(data, verify=False).samples
    if not samples:
        raise ParityError(f"no images under {data} for the parity check")
    step = max(1, len(samples) // count)
    return np.stack([load_input(s.image, contract.input)[1] for s in samples[::step][:count]])


def _tolerance(x: np.ndarray) -> np.ndarray:
    return ATOL + RTOL * np.abs(x)


def _compare_dense(contract: ModelContract, torch_out: list[Outputs], ort_out: list[Outputs],
                   need: float = 1.0) -> dict[str, Any]:
    """Logits / mask logits: elementwise bound, then argmax agreement on >= ``need`` of the
    argmaxes (images for classification, pixels for segmentation)."""
    name = contract.outputs.tensor_names()[0]
    r = np.stack([o[name] for o in torch_out])
    g = np.stack([o[name] for o in ort_out])
    diff = float(np.abs(r - g).max())
    if (np.abs(r - g) > _tolerance(r)).any():
        raise ParityError(f"{contract.task} outputs differ by up to {diff:.3g} (bound {ATOL} + {RTOL}*|x|)")
    axis = 1 if r.ndim > 2 else -1  # class axis: [N, C] or [N, C, H, W]
    agree = float((r.argmax(axis) == g.argmax(axis)).mean())
    if agree < need:
        raise ParityError(f"argmax agrees on {agree:.4%} only (need {need:.1%})")
    report: dict[str, Any] = {"max_abs_diff": diff, "argmax_agreement": agree}
    for extra in contract.outputs.tensor_names()[1:]:  # embedding, cam
        r = np.stack([o[extra] for o in torch_out])
        g = np.stack([o[extra] for o in ort_out])
        if (np.abs(r - g) > _tolerance(r)).any():
            raise ParityError(f"output {extra!r} differs by up to {float(np.abs(r - g).max()):.3g} "
                              f"(bound {ATOL} + {RTOL}*|x|)")
        report[f"{extra}_max_abs_diff"] = float(np.abs(r - g).max())
    return report


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
    close = np.abs(ss[keep][:, None] - ds[None, :]) <= _tolerance(ss[keep])[:, None]
    ok = (iou >= 0.99) & (sl[keep][:, None] == dl[None, :]) & close
    return int((~ok.any(axis=1)).sum())


def _compare_detections(contract: ModelContract, torch_out: list[Outputs], ort_out: list[Outputs]) -> dict[str, Any]:
    o = contract.outputs
    score_diff, missing, compared = 0.0, 0, 0
    for t_img, o_img in zip(torch_out, ort_out):
        t = (t_img[o.boxes].reshape(-1, 4), t_img[o.scores].reshape(-1), t_img[o.labels].reshape(-1))
        g = (o_img[o.boxes].reshape(-1, 4), o_img[o.scores].reshape(-1), o_img[o.labels].reshape(-1))
        rs, gs = -np.sort(-t[1]), -np.sort(-g[1])
        k = min(len(rs), len(gs))
        if k:
            floor = max(rs[k - 1], gs[k - 1]) + 1e-3
            above = rs[:k] > floor
            excess = (np.abs(rs[:k] - gs[:k]) - _tolerance(rs[:k])) * above
            if (excess > 0).any():
                raise ParityError(f"sorted scores differ by up to {float(np.abs(rs[:k] - gs[:k]).max()):.3g} "
                                  f"(bound {ATOL} + {RTOL}*|score|)")
            score_diff = max(score_diff, float((np.abs(rs[:k] - gs[:k]) * above).max()))
        missing += _unmatched(t, g, 0.05) + _unmatched(g, t, 0.05)
        compared += int((t[1] >= 0.05).sum()) + int((g[1] >= 0.05).sum())
    if missing > 0.02 * compared:
        raise ParityError(f"{missing} of {compared} detections (score >= 0.05) have no twin between PyTorch and ONNX")
    return {"sorted_score_max_diff": score_diff, "unmatched_detections": missing, "detections_compared": compared}


KEYPOINT_ATOL = 0.05  # input pixels: float32 coordinates of a few hundred pixels round at ~1e-4


def _twins(contract: ModelContract, torch_out: list[Outputs], ort_out: list[Outputs]
           ) -> Iterator[tuple[Outputs, Outputs, int, int]]:
    """Each PyTorch detection scoring >= 0.05 that has a twin in ONNX Runtime's answer for the
    same image (same label, IoU >= 0.99; the best such): (PyTorch outputs, ONNX Runtime outputs,
    its row, the twin's row). Detections without a twin are the detection comparison's."""
    o = contract.outputs
    for t_img, o_img in zip(torch_out, ort_out):
        rows = np.flatnonzero(t_img[o.scores].reshape(-1) >= 0.05)
        g_boxes = o_img[o.boxes].reshape(-1, 4)
        if not len(rows) or not len(g_boxes):
            continue
        iou = _box_iou(t_img[o.boxes].reshape(-1, 4)[rows], g_boxes)
        same = (iou >= 0.99) & (t_img[o.labels].reshape(-1)[rows][:, None] == o_img[o.labels].reshape(-1)[None, :])
        for i, r in enumerate(rows):
            if same[i].any():
                yield t_img, o_img, int(r), int(np.argmax(np.where(same[i], iou[i], -1)))


def check_keypoints_agree(contract: ModelContract, torch_out: list[Outputs], ort_out: list[Outputs]) -> dict[str, Any]:
    """Detections as for detection; then each twin's keypoints (same label, IoU >= 0.99):
    x and y within KEYPOINT_ATOL pixels and confidence within the bound on >= 99% of them
    (a keypoint refined to the nearer of two equidistant heatmap peaks may go either way)."""
    report = _compare_detections(contract, torch_out, ort_out)
    name = contract.outputs.keypoints
    compared = off = 0
    for t_img, o_img, r, g in _twins(contract, torch_out, ort_out):
        p = t_img[name].shape[-2]
        a, b = t_img[name].reshape(-1, p, 3)[r], o_img[name].reshape(-1, p, 3)[g]
        bad = ((np.abs(a[:, :2] - b[:, :2]) > KEYPOINT_ATOL).any(axis=1)
               | (np.abs(a[:, 2] - b[:, 2]) > _tolerance(a[:, 2])))
        compared += p
        off += int(bad.sum())
    if off > 0.01 * compared:
        raise ParityError(f"{off} of {compared} keypoints of twin detections differ by more than {KEYPOINT_ATOL} px "
                          f"or the confidence bound between PyTorch and ONNX")
    return {**report, "keypoints_compared": compared, "keypoints_differing": off}


def check_masks_agree(contract: ModelContract, torch_out: list[Outputs], ort_out: list[Outputs]) -> dict[str, Any]:
    """Detections as for detection; then each twin's mask (same label, IoU >= 0.99): its
    probabilities within the bound on >= 99.9% of cells (a cell on a box's edge may fall
    either side of YOLACT's crop when the box moves by rounding)."""
    report = _compare_detections(contract, torch_out, ort_out)
    name = contract.outputs.masks
    compared = off = 0
    worst = 0.0
    for t_img, o_img, r, g in _twins(contract, torch_out, ort_out):
        a = t_img[name].reshape(-1, *t_img[name].shape[-2:])[r]
        diff = np.abs(a - o_img[name].reshape(-1, *o_img[name].shape[-2:])[g])
        off += int((diff > _tolerance(a)).sum())
        compared += diff.size
        worst = max(worst, float(diff.max()))
    if off > 0.001 * compared:
        raise ParityError(f"{off} of {compared} mask cells of twin detections differ beyond the bound "
                          f"(up to {worst:.3g}) between PyTorch and ONNX")
    return {**report, "mask_cells_compared": compared, "mask_cells_differing": off, "mask_max_diff": worst}


EMBEDDING_MIN_COSINE = 0.9999  # one image's PyTorch and ONNX embeddings: float32 rounding keeps > 0.99999
NEIGHBOUR_TIE = 1e-4  # cosine similarities this close are a tie


def check_embeddings_agree(contract: ModelContract, torch_out: list[Outputs], ort_out: list[Outputs]
                           ) -> dict[str, Any]:
    """Embeddings: every component within the bound, each image's two vectors at cosine
    >= EMBEDDING_MIN_COSINE, and each image's nearest other image of the batch the same in
    both (what a gallery search returns must not change with the runtime)."""
    name = contract.outputs.embedding or ""
    r = np.stack([o[name] for o in torch_out]).astype(np.float64)
    g = np.stack([o[name] for o in ort_out]).astype(np.float64)
    diff = float(np.abs(r - g).max())
    if (np.abs(r - g) > _tolerance(r)).any():
        raise ParityError(f"embeddings differ by up to {diff:.3g} (bound {ATOL} + {RTOL}*|x|)")
    unit = [x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in (r, g)]
    cosine = float((unit[0] * unit[1]).sum(axis=1).min())
    if cosine < EMBEDDING_MIN_COSINE:
        raise ParityError(f"an image's embeddings have cosine similarity {cosine:.6f} between PyTorch and ONNX "
                          f"(need >= {EMBEDDING_MIN_COSINE})")
    sims = [u @ u.T for u in unit]
    for sim in sims:
        np.fill_diagonal(sim, -np.inf)
    rows = np.arange(len(r))
    best_torch, best_onnx = sims[0].argmax(axis=1), sims[1].argmax(axis=1)
    # ONNX's nearest is another image only if PyTorch ranks it lower by more than rounding (a tie may go either way)
    moved = int((sims[0][rows, best_onnx] < sims[0][rows, best_torch] - NEIGHBOUR_TIE).sum()) if len(r) > 1 else 0
    if moved:
        raise ParityError(f"{moved} of {len(r)} images have another nearest neighbour in ONNX than in PyTorch")
    return {"max_abs_diff": diff, "min_cosine": cosine, "nearest_neighbours_compared": len(r)}


COMPARE: dict[str, Callable[[ModelContract, list[Outputs], list[Outputs]], dict[str, Any]]] = {
    "classification": _compare_dense,
    "segmentation": functools.partial(_compare_dense, need=0.999),
    "detection": _compare_detections,
    "keypoints": check_keypoints_agree,
    "instance_segmentation": check_masks_agree,
    "embedding": check_embeddings_agree,
}


def check_parity(model: ConvNet, onnx_path: Path, contract: ModelContract, data: Path, count: int = 16
                 ) -> dict[str, Any]:
    """Compare ``model`` (PyTorch) and the ONNX file on real images; raises ParityError, returns a report."""
    batch = sample_batch(data, contract, count)
    onnx_model = OnnxModel.load(onnx_path, "parity", "0", "cpu", threads=2)
    predict = predictor(model, contract)
    step = len(batch) if model.batchable else 1  # graphs of one image per call: one at a time in PyTorch too
    torch_out = [o for i in range(0, len(batch), step) for o in predict(batch[i:i + step])]
    report = COMPARE[contract.task](contract, torch_out, onnx_model.infer(batch))
    return {"images": int(len(batch)), "atol": ATOL, "rtol": RTOL, **report}
