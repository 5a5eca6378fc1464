"""Annotated images: a task's answer drawn on the original image (Pillow's ImageDraw).

Each task has a drawer in :data:`DRAWERS`, looked up by task name, that draws one image's
outputs exactly as the JSON answer states them (the same core.tasks result, or the same
class map it encodes), so a rendered image and the JSON for the same request agree:

- classification: the top labels with their scores in a box at the top left; with
  ``cam=true``, the best label's class activation map blended over the image;
- detection: each box outlined in its label's colour, with the label and score above it;
- segmentation: each class's pixels blended in its label's colour, with a legend;
- instance segmentation: each object's mask blended in a colour of its own (by rank: touching
  objects of one class stay apart), its box outlined in that colour, label and score above;
- keypoints: each object's box and label as for detection, its skeleton's edges as lines and
  its keypoints as dots (those scoring at least KEYPOINT_DRAW_SCORE; the playground the same).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core import postprocess
from core.contract import ModelContract
from core.geometry import Geometry
from core.tasks import TASKS, Outputs

FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
# Distinct colours (Tableau 10), label_id modulo their count.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
MASK_ALPHA = 0.5
KEYPOINT_DRAW_SCORE = 0.3  # keypoints less certain than this are in the answer but not drawn
# Larger images are drawn reduced to at most this many pixels (by a whole factor, box-filtered):
# the annotated copy, its blends and the encoded answer grow with the canvas, and a 100 MP
# render with cam=true took 8 s and 2.3 GB at full size.
MAX_PIXELS = 16_000_000


def colour(label_id: int) -> tuple[int, int, int]:
    """The colour of ``label_id`` (the playground uses the same table)."""
    return PALETTE[label_id % len(PALETTE)]


def _font(image: Image.Image) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(11, min(image.size) // 40)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: tuple[int, int, int],
           font: Any) -> None:
    """``text`` on a filled box whose bottom-left corner is ``xy`` (kept inside the image)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x = min(max(0.0, xy[0]), max(0.0, draw.im.size[0] - w))
    y = max(0.0, xy[1] - h)
    draw.rectangle([x, y, x + w, y + h], fill=fill)
    draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)


Drawer = Callable[[Image.Image, Outputs, Geometry, ModelContract, Mapping[str, Any]], Image.Image]


def canvas(image: Image.Image) -> Image.Image:
    """``image`` as the RGB canvas to draw on: the original size, or reduced by the smallest
    whole factor that brings it within MAX_PIXELS."""
    factor = math.ceil(math.sqrt(image.width * image.height / MAX_PIXELS))
    reduced = image.reduce(factor) if factor > 1 else image
    return reduced if reduced.mode == "RGB" else reduced.convert("RGB")


def annotate(image: Image.Image, task: str, outputs: Outputs, geometry: Geometry, contract: ModelContract,
             options: Mapping[str, Any]) -> Image.Image:
    """A copy of ``image`` (the original, or a :func:`canvas` of it) with one image's
    ``outputs`` of a ``task`` model drawn on it, as its answer with ``options`` states them;
    ``geometry`` maps model input to the original image."""
    drawn = image.copy() if image.mode == "RGB" else image.convert("RGB")
    return DRAWERS[task](drawn, outputs, _on_canvas(geometry, drawn.size), contract, options)


def _on_canvas(geometry: Geometry, size: tuple[int, int]) -> Geometry:
    """``geometry`` for a canvas of ``size`` instead of the original image (the same when equal)."""
    sx, sy = size[0] / geometry.orig_width, size[1] / geometry.orig_height
    if (sx, sy) == (1.0, 1.0):
        return geometry
    return dataclasses.replace(geometry, orig_width=size[0], orig_height=size[1], scale_x=geometry.scale_x / sx,
                               scale_y=geometry.scale_y / sy)


def _style(canvas: Image.Image) -> tuple[ImageDraw.ImageDraw, Any, int]:
    """A drawing context, the label font and the line width for ``canvas``'s size."""
    return ImageDraw.Draw(canvas), _font(canvas), max(2, min(canvas.size) // 150)


def draw_classification(canvas: Image.Image, outputs: Outputs, geometry: Geometry, contract: ModelContract,
                        options: Mapping[str, Any]) -> Image.Image:
    """The top labels; with ``cam``, the best label's class activation map under them."""
    labels = TASKS["classification"].result(outputs, geometry, contract, {**options, "cam": False})["labels"]
    if options.get("cam") and labels:
        heat = postprocess.heatmap(outputs[contract.outputs.cam][labels[0]["label_id"]], geometry, contract.input)
        # blend_heatmap stretches the bounded heatmap over the canvas, strip by strip
        canvas = Image.fromarray(postprocess.blend_heatmap(np.asarray(canvas), heat.astype(np.float32) / 255.0),
                                 "RGB")
    draw, font, _ = _style(canvas)
    _legend(draw, [(f"{i['label']} {i['score']:.3f}", i["label_id"]) for i in labels], font)
    return canvas


def draw_detection(canvas: Image.Image, outputs: Outputs, geometry: Geometry, contract: ModelContract,
                   options: Mapping[str, Any]) -> Image.Image:
    """Each detection's box and label; the best is drawn last, on top."""
    found = TASKS["detection"].result(outputs, geometry, contract, options)["detections"]
    draw, font, width = _style(canvas)
    for d in sorted(found, key=lambda d: d["score"]):
        c = colour(d["label_id"])
        draw.rectangle(d["box"], outline=c, width=width)
        _label(draw, (d["box"][0], d["box"][1]), f"{d['label']} {d['score']:.2f}", c, font)
    return canvas


def draw_keypoints(canvas: Image.Image, outputs: Outputs, geometry: Geometry, contract: ModelContract,
                   options: Mapping[str, Any]) -> Image.Image:
    """Each object's box and label, then its skeleton: edges between, and dots on, the keypoints
    scoring at least KEYPOINT_DRAW_SCORE; the best object is drawn last, on top."""
    found = TASKS["keypoints"].result(outputs, geometry, contract, options)["detections"]
    edges = contract.keypoints.skeleton if contract.keypoints else []
    draw, font, width = _style(canvas)
    radius = max(2, width + 1)
    for d in sorted(found, key=lambda d: d["score"]):
        c = colour(d["label_id"])
        draw.rectangle(d["box"], outline=c, width=max(1, width // 2))
        _label(draw, (d["box"][0], d["box"][1]), f"{d['label']} {d['score']:.2f}", c, font)
        points = d["keypoints"]
        shown = [p["score"] >= KEYPOINT_DRAW_SCORE for p in points]
        for a, b in edges:
            if shown[a] and shown[b]:
                draw.line([(points[a]["x"], points[a]["y"]), (points[b]["x"], points[b]["y"])], fill=c, width=width)
        for p, on in zip(points, shown):
            if on:
                draw.ellipse([p["x"] - radius, p["y"] - radius, p["x"] + radius, p["y"] + radius], fill=(255, 255, 255),
                             outline=c, width=max(1, width // 2))
    return canvas


def draw_instances(canvas: Image.Image, outputs: Outputs, geometry: Geometry, contract: ModelContract,
                   options: Mapping[str, Any]) -> Image.Image:
    """Each object's mask (the windows the answer encodes) in the colour of its rank, its box
    and label; the best object last, on top."""
    o = contract.outputs
    found = postprocess.select_instances(outputs[o.boxes], outputs[o.scores], outputs[o.labels], outputs[o.masks],
                                         geometry, contract.input, contract.labels, options["score_threshold"],
                                         options["max_detections"])
    rgb = np.asarray(canvas).copy()
    for rank in reversed(range(len(found))):
        window, top, left = found[rank][1]
        if window.any():
            region = rgb[top:top + window.shape[0], left:left + window.shape[1]]
            region[window] = np.round(region[window] * (1 - MASK_ALPHA)
                                      + np.array(colour(rank), np.float32) * MASK_ALPHA).astype(np.uint8)
    canvas = Image.fromarray(rgb, "RGB")
    draw, font, width = _style(canvas)
    for rank in reversed(range(len(found))):
        d = found[rank][0]
        draw.rectangle(d["box"], outline=colour(rank), width=max(1, width // 2))
        _label(draw, (d["box"][0], d["box"][1]), f"{d['label']} {d['score']:.2f}", colour(rank), font)
    return canvas


def draw_segmentation(canvas: Image.Image, outputs: Outputs, geometry: Geometry, contract: ModelContract,
                      options: Mapping[str, Any]) -> Image.Image:
    """The class map the answer encodes (label 0, background, left clear) and a legend."""
    o = contract.outputs
    cmap = postprocess.class_map(outputs[o.masks], o.kind, geometry)
    canvas = _blend_classes(canvas, cmap)
    counts = np.bincount(cmap.reshape(-1))
    names = contract.labels
    draw, font, _ = _style(canvas)
    _legend(draw, [(f"{names[i] if i < len(names) else i} ({counts[i]} px)", int(i))
                   for i in np.flatnonzero(counts) if i != 0], font)
    return canvas


DRAWERS: dict[str, Drawer] = {"classification": draw_classification, "detection": draw_detection,
                              "segmentation": draw_segmentation, "keypoints": draw_keypoints,
                              "instance_segmentation": draw_instances}


def _legend(draw: ImageDraw.ImageDraw, lines: list[tuple[str, int]], font: Any) -> None:
    """One labelled box per (text, label_id) line, down the top-left corner."""
    y = 0.0
    for text, label_id in lines:
        box = draw.textbbox((0, 0), text, font=font)
        y += box[3] - box[1] + 6
        _label(draw, (0, y), text, colour(label_id), font)


def _blend_classes(canvas: Image.Image, cmap: np.ndarray) -> Image.Image:
    """Blend every labelled pixel (class map value > 0) in its label's colour."""
    rgb = np.asarray(canvas)
    fg = cmap > 0
    if not fg.any():
        return canvas
    lut = np.array([colour(i) for i in range(int(cmap.max()) + 1)], np.float32)
    out = rgb.copy()
    out[fg] = np.round(rgb[fg].astype(np.float32) * (1 - MASK_ALPHA) + lut[cmap[fg]] * MASK_ALPHA).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    """``image`` as PNG or JPEG (quality 90) bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
