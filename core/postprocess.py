"""Pure functions from raw model outputs (one image) to JSON-ready results.

Boxes come back as ``[x1, y1, x2, y2]`` in original image pixels; masks are never dense
arrays: COCO RLE (pycocotools-compatible) by default, polygons or a class-index PNG on request.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from core.contract import InputSpec
from core.geometry import Geometry, resize_class_map


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for large logits."""
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, kind: str, labels: list[str], k: int) -> list[dict[str, Any]]:
    """Top-k classes of one image's [C] scores (softmaxed first when they are logits)."""
    probs = softmax(scores.astype(np.float64)) if kind == "logits" else scores.astype(np.float64)
    k = min(k, probs.shape[-1])
    idx = np.argsort(-probs)[:k]
    return [{"label": labels[i], "label_id": int(i), "score": round(float(probs[i]), 6)} for i in idx]


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """``vector`` / its L2 norm (a zero vector stays zero)."""
    v = vector.astype(np.float64).reshape(-1)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def heatmap(cam: np.ndarray, geometry: Geometry, spec: InputSpec) -> np.ndarray:
    """One class's activation map (an [h, w] grid over the model input) as uint8 at the
    original image size: scaled so its maximum is 255, padding (letterbox) cropped off,
    resized bilinearly."""
    grid = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), "F")
    full = grid.resize((spec.width, spec.height), Image.BILINEAR)
    content = full.crop((0, 0, geometry.content_width, geometry.content_height))
    out = np.asarray(content.resize((geometry.orig_width, geometry.orig_height), Image.BILINEAR))
    top = float(out.max())
    if top <= 0:
        return np.zeros(out.shape, np.uint8)
    return np.clip(np.round(out * (255.0 / top)), 0, 255).astype(np.uint8)


def heatmap_png(cam: np.ndarray, geometry: Geometry, spec: InputSpec) -> str:
    """:func:`heatmap` as a base64 greyscale PNG."""
    return _png_base64(heatmap(cam, geometry, spec))


def blend_heatmap(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """An RGB image [H, W, 3] with ``heat`` [H, W] in 0..1 blended over it: blue (cold)
    through yellow to red (hot), opacity growing with the heat (0.25 to 0.7). The
    playground draws the same (service/static/playground/playground.js)."""
    t = heat.astype(np.float32)[..., None]
    hot = np.concatenate([np.clip(2 * t, 0, 1), np.clip(2 - np.abs(4 * t - 2), 0, 1), np.clip(1 - 2 * t, 0, 1)], -1) * 255
    alpha = 0.25 + 0.45 * t
    return np.round(rgb.astype(np.float32) * (1 - alpha) + hot * alpha).astype(np.uint8)


def detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, geometry: Geometry,
               label_names: list[str], score_threshold: float, max_detections: int) -> list[dict[str, Any]]:
    """One image's padded detections above ``score_threshold``, best first, at most
    ``max_detections``, boxes mapped to original pixels and rounded to 0.01 px."""
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_detections]
    mapped = geometry.boxes_to_original(boxes[keep])
    out = []
    for box, s, lab in zip(mapped, scores[keep], labels[keep]):
        lab = int(lab)
        out.append({"box": [round(float(v), 2) for v in box], "score": round(float(s), 6),
                    "label": label_names[lab] if 0 <= lab < len(label_names) else str(lab), "label_id": lab})
    return out


def class_map(masks: np.ndarray, kind: str, geometry: Geometry) -> np.ndarray:
    """One image's mask output ([C,h,w] logits or [h,w] class map) -> class map at original size."""
    cmap = masks.argmax(axis=0) if kind == "mask_logits" else masks
    return resize_class_map(cmap, geometry)


def encode_rle(binary: np.ndarray) -> dict[str, Any]:
    """COCO RLE (compressed counts string), as pycocotools.mask.encode writes it."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_polygons(binary: np.ndarray) -> list[list[float]]:
    """Outer contours as COCO polygons: lists of [x1, y1, x2, y2, ...] (3+ points each)."""
    import cv2

    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def encode_png(cmap: np.ndarray) -> str:
    """The class-index map as a base64 single-channel PNG (pixel value = label_id)."""
    return _png_base64(cmap)


def _png_base64(grey: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(grey.astype(np.uint8), "L").save(buf, format="PNG", optimize=False, compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def segments(cmap: np.ndarray, label_names: list[str], mask_format: str) -> dict[str, Any]:
    """Per-class results for a class map at original size; label 0 is background (skipped).
    ``mask_format`` is one of core.tasks.MASK_FORMATS."""
    counts = np.bincount(cmap.reshape(-1), minlength=len(label_names))
    classes = []
    for lab in np.flatnonzero(counts):
        if lab == 0:
            continue
        binary = cmap == lab
        ys = np.flatnonzero(binary.any(axis=1))
        xs = np.flatnonzero(binary.any(axis=0))
        item: dict[str, Any] = {
            "label": label_names[lab] if lab < len(label_names) else str(lab), "label_id": int(lab),
            "area": int(counts[lab]), "bbox": [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1],
        }
        if mask_format == "rle":
            item["rle"] = encode_rle(binary)
        elif mask_format == "polygon":
            item["polygons"] = encode_polygons(binary)
        classes.append(item)
    result: dict[str, Any] = {"classes": classes}
    if mask_format == "png":
        result["mask_png"] = encode_png(cmap)
    return result
