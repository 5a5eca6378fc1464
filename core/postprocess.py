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
from core.geometry import Geometry, resize_class_map, strips


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


# A heatmap is at most this many pixels on its long side (aspect kept): the original size up
# to 1024 px, scaled down beyond. A CAM grid has a few cells a side (4x4 for the shipped
# classifier), so more pixels only interpolate. Measured, cam=true (top_k 5) on a 10000x10000
# PNG: 13.5 s and 6.4 MB of JSON with five 100 MP heatmaps, 1.4 s and 0.2 MB at 1024 px (five
# 1024x1024 heatmaps take 0.1 s).
HEATMAP_MAX_SIDE = 1024
# Rows blended at a time: a strip of this many pixels (about 12 float32 arrays of it, ~3 MB).
_BLEND_STRIP_PIXELS = 1 << 16


def heatmap_size(geometry: Geometry, max_side: int = HEATMAP_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of a heatmap for ``geometry``'s original image: its size, scaled down
    (aspect kept, at least 1 px) so the long side is at most ``max_side``."""
    w, h = geometry.orig_width, geometry.orig_height
    s = min(1.0, max_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def heatmap(cam: np.ndarray, geometry: Geometry, spec: InputSpec, max_side: int = HEATMAP_MAX_SIDE) -> np.ndarray:
    """One class's activation map (an [h, w] grid over the model input) as uint8 over the
    original image, at :func:`heatmap_size` (the original size up to ``max_side`` px on the
    long side): scaled so its maximum is 255, padding (letterbox) cropped off, resized
    bilinearly."""
    grid = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), "F")
    full = grid.resize((spec.width, spec.height), Image.BILINEAR)
    content = full.crop((0, 0, geometry.content_width, geometry.content_height))
    out = np.asarray(content.resize(heatmap_size(geometry, max_side), Image.BILINEAR))
    top = float(out.max())
    if top <= 0:
        return np.zeros(out.shape, np.uint8)
    return np.clip(np.round(out * (255.0 / top)), 0, 255).astype(np.uint8)


def heatmap_png(cam: np.ndarray, geometry: Geometry, spec: InputSpec, max_side: int = HEATMAP_MAX_SIDE) -> str:
    """:func:`heatmap` as a base64 greyscale PNG (its size is the PNG's: stretch it over the
    image to overlay it)."""
    return _png_base64(heatmap(cam, geometry, spec, max_side))


def blend_heatmap(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """An RGB image [H, W, 3] with ``heat`` [h, w] in 0..1 blended over it: blue (cold)
    through yellow to red (hot), opacity growing with the heat (0.25 to 0.7). The
    playground draws the same (service/static/playground/playground.js). ``heat`` smaller
    than the image (a bounded :func:`heatmap`) is stretched over it bilinearly. Strip by
    strip, so the float32 temporaries are a few MB whatever the image's size: at 20 MP
    (tracemalloc) 63 MB, the output, and 0.7 s; all at once it was 960 MB (48 bytes a pixel)
    and 2.8 s."""
    height, width = rgb.shape[:2]
    grid = None if heat.shape == (height, width) else Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32), "F")
    out = np.empty((height, width, 3), np.uint8)
    for y0, y1 in strips((width, height), _BLEND_STRIP_PIXELS):
        t = heat[y0:y1] if grid is None else _stretched_rows(grid, width, height, y0, y1)
        out[y0:y1] = _blend(rgb[y0:y1], t)
    return out


def _stretched_rows(grid: Image.Image, width: int, height: int, y0: int, y1: int) -> np.ndarray:
    """Rows y0..y1 of ``grid`` (mode F) resized bilinearly to ``width`` x ``height``, computed
    alone (Pillow's resize box: the rows of the whole resize, to float32 rounding)."""
    sy = grid.height / height
    return np.asarray(grid.resize((width, y1 - y0), Image.BILINEAR, box=(0, y0 * sy, grid.width, y1 * sy)))


def _blend(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """:func:`blend_heatmap` of ``rgb`` and ``heat`` of the same size, all at once."""
    t = heat.astype(np.float32)[..., None]
    hot = np.concatenate([np.clip(2 * t, 0, 1), np.clip(2 - np.abs(4 * t - 2), 0, 1), np.clip(1 - 2 * t, 0, 1)],
                         -1) * 255
    alpha = 0.25 + 0.45 * t
    return np.round(rgb.astype(np.float32) * (1 - alpha) + hot * alpha).astype(np.uint8)


def kept_detections(scores: np.ndarray, score_threshold: float, max_detections: int) -> np.ndarray:
    """Indices of one image's padded detections scoring at least ``score_threshold``, best first
    (ties in output order), at most ``max_detections``."""
    scores = scores.reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)
    return keep[np.argsort(-scores[keep], kind="stable")][:max_detections]


def select_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, geometry: Geometry,
                      score_threshold: float, max_detections: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's padded detections above ``score_threshold``, best first, at most
    ``max_detections``: boxes [K, 4] mapped to original pixels and rounded to 0.01 px, scores
    [K] rounded to 6 decimals (float64, as the JSON answer states them), labels [K] int64."""
    return _selected(boxes, scores, labels, geometry, kept_detections(scores, score_threshold, max_detections))


def _selected(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, geometry: Geometry, keep: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``keep`` rows of one image's padded detections, mapped and rounded as the answer states them."""
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    mapped = geometry.boxes_to_original(boxes[keep]).astype(np.float64)
    return np.round(mapped, 2), np.round(scores[keep].astype(np.float64), 6), labels[keep].astype(np.int64)


def detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, geometry: Geometry,
               label_names: list[str], score_threshold: float, max_detections: int) -> list[dict[str, Any]]:
    """:func:`select_detections` as JSON-ready dicts (box, score, label, label_id)."""
    return kept_objects(boxes, scores, labels, geometry, label_names, score_threshold, max_detections)[1]


def kept_objects(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, geometry: Geometry,
                 label_names: list[str], score_threshold: float, max_detections: int
                 ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """:func:`detections`, and the rows of the padded outputs they came from (where an object's
    other outputs, its mask or keypoints, are)."""
    keep = kept_detections(scores, score_threshold, max_detections)
    kept_boxes, kept_scores, kept_labels = _selected(boxes, scores, labels, geometry, keep)
    out = []
    for box, s, lab in zip(kept_boxes.tolist(), kept_scores.tolist(), kept_labels.tolist()):
        out.append({"box": box, "score": s,
                    "label": label_names[lab] if 0 <= lab < len(label_names) else str(lab), "label_id": lab})
    return keep, out


def keypoints_to_original(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """[..., P, 3] keypoints (x, y in model-input pixels, confidence) -> x, y in original pixels,
    clipped to the image and rounded to 0.01 px; confidences rounded to 6 decimals (float64)."""
    out = points.astype(np.float64, copy=True)
    out[..., 0] = np.clip(out[..., 0] / geometry.scale_x, 0, geometry.orig_width)
    out[..., 1] = np.clip(out[..., 1] / geometry.scale_y, 0, geometry.orig_height)
    out[..., :2] = np.round(out[..., :2], 2)
    out[..., 2] = np.round(np.clip(out[..., 2], 0.0, 1.0), 6)
    return out


def pose_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, points: np.ndarray,
                    geometry: Geometry, label_names: list[str], keypoint_names: list[str], score_threshold: float,
                    max_detections: int) -> list[dict[str, Any]]:
    """:func:`detections`, each with its ``keypoints``: one ``{name, x, y, score}`` per keypoint
    of the model's skeleton, x and y in original pixels, score the keypoint's confidence."""
    keep, found = kept_objects(boxes, scores, labels, geometry, label_names, score_threshold, max_detections)
    mapped = keypoints_to_original(points.reshape(-1, len(keypoint_names), 3)[keep], geometry)
    for item, kps in zip(found, mapped.tolist()):
        item["keypoints"] = [{"name": n, "x": x, "y": y, "score": c} for n, (x, y, c) in zip(keypoint_names, kps)]
    return found


def encode_rle_window(window: np.ndarray, top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """COCO RLE of a ``height x width`` image that is zero except for the binary ``window``
    placed at (``top``, ``left``): the same string :func:`encode_rle` writes for the full
    array, computed from the window's columns only (an instance's mask on a large image costs
    its box, not the image)."""
    from pycocotools import mask as mask_utils

    h, w = window.shape
    if not window.size:
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    strip = np.zeros((height, w), np.uint8)  # the window's columns, full height: column-major runs
    strip[top:top + h] = window
    flat = strip.reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:  # RLE starts with a run of zeros
        runs.insert(0, 0)
    runs[0] += left * height
    trailing = (width - left - w) * height  # the columns after the strip
    if len(runs) % 2 == 1:  # the strip ends in zeros: they extend that run
        runs[-1] += trailing
    elif trailing:
        runs.append(trailing)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def instance_windows(boxes: np.ndarray, masks: np.ndarray, geometry: Geometry, spec: InputSpec
                     ) -> list[tuple[np.ndarray, int, int]]:
    """Each detection's binary mask at original resolution inside its box: (window, top, left).

    ``boxes`` [K, 4] in original pixels, ``masks`` [K, h, w] probabilities over the model input.
    Each window samples its mask bilinearly (Pillow, the source rectangle mapped through the
    geometry) and keeps the pixels above 0.5. The probabilities are resampled as 8-bit levels
    (1 byte a pixel, not float32's 4: an object covering a 100 MP upload costs 100 MB, not 400)."""
    out = []
    k, h, w = masks.shape
    sx, sy = w / spec.width, h / spec.height  # model-input pixels -> mask cells
    levels = np.round(np.clip(masks, 0.0, 1.0) * 255).astype(np.uint8)
    for box, prob in zip(boxes, levels):
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1 = min(int(np.ceil(box[2])), geometry.orig_width)
        y1 = min(int(np.ceil(box[3])), geometry.orig_height)
        if x1 <= x0 or y1 <= y0:
            out.append((np.zeros((0, 0), bool), y0, x0))
            continue
        source = (x0 * geometry.scale_x * sx, y0 * geometry.scale_y * sy, x1 * geometry.scale_x * sx,
                  y1 * geometry.scale_y * sy)
        window = np.asarray(Image.fromarray(prob, "L").resize((x1 - x0, y1 - y0), Image.BILINEAR, box=source))
        out.append((window > 127, y0, x0))
    return out


def select_instances(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                     geometry: Geometry, spec: InputSpec, label_names: list[str], score_threshold: float,
                     max_detections: int) -> list[tuple[dict[str, Any], tuple[np.ndarray, int, int]]]:
    """:func:`detections`, each with its mask's window at the original resolution
    (:func:`instance_windows`): what the answer encodes and a drawing paints."""
    keep, found = kept_objects(boxes, scores, labels, geometry, label_names, score_threshold, max_detections)
    k = masks.shape[-3]
    windows = instance_windows(np.array([d["box"] for d in found], np.float64).reshape(-1, 4),
                               masks.reshape(k, *masks.shape[-2:])[keep], geometry, spec)
    return list(zip(found, windows))


def instance_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                        geometry: Geometry, spec: InputSpec, label_names: list[str], score_threshold: float,
                        max_detections: int, mask_format: str) -> list[dict[str, Any]]:
    """:func:`detections`, each with its own mask at the original image size: ``area`` (pixels)
    and, by ``mask_format``, ``rle`` (COCO RLE of the whole image), ``polygons`` (COCO polygons
    in original pixels) or ``mask_png`` (a base64 PNG of the mask inside ``mask_box``, the
    integer [x1, y1, x2, y2] window it covers: 255 = the object)."""
    found = []
    for item, (window, top, left) in select_instances(boxes, scores, labels, masks, geometry, spec, label_names,
                                                      score_threshold, max_detections):
        found.append(item)
        item["area"] = int(window.sum())
        if mask_format == "rle":
            item["rle"] = encode_rle_window(window, top, left, geometry.orig_height, geometry.orig_width)
        elif mask_format == "polygon":
            item["polygons"] = [[v + (left if i % 2 == 0 else top) for i, v in enumerate(poly)]
                                for poly in encode_polygons(window)] if window.size else []
        else:
            item["mask_box"] = [left, top, left + window.shape[1], top + window.shape[0]]
            item["mask_png"] = _png_base64(window.astype(np.uint8) * 255) if window.size else ""
    return found


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
