"""Annotated images: a task's JSON result drawn on the original image (Pillow's ImageDraw).

Pure functions of (image, result): what is drawn is exactly what the JSON answer says, so
a rendered image and the JSON for the same request always agree.

- classification: the top labels with their scores in a box at the top left; with
  ``cam=true``, the best label's class activation map blended over the image;
- detection: each box outlined in its label's colour, with the label and score above it;
- segmentation: each class's mask (RLE, polygons or the class-index PNG, whichever the
  answer carries) blended in its label's colour, with a legend.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
# Distinct colours (Tableau 10), label_id modulo their count.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
MASK_ALPHA = 0.5


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


def annotate(image: Image.Image, task: str, result: dict[str, Any], labels: list[str]) -> Image.Image:
    """A copy of ``image`` (RGB, original size) with ``result`` (one image's JSON result of
    ``task``) drawn on it."""
    canvas = image.convert("RGB")
    if task == "segmentation":
        canvas = _masks(canvas, result)
    elif task == "classification" and result["labels"] and "heatmap_png" in result["labels"][0]:
        canvas = _heatmap(canvas, _png(result["labels"][0]["heatmap_png"]))
    draw = ImageDraw.Draw(canvas)
    font = _font(canvas)
    width = max(2, min(canvas.size) // 150)
    if task == "detection":
        for d in sorted(result["detections"], key=lambda d: d["score"]):  # best drawn last, on top
            c = colour(d["label_id"])
            draw.rectangle(d["box"], outline=c, width=width)
            _label(draw, (d["box"][0], d["box"][1]), f"{d['label']} {d['score']:.2f}", c, font)
    elif task == "classification":
        _legend(draw, [(f"{i['label']} {i['score']:.3f}", i["label_id"]) for i in result["labels"]], font)
    elif task == "segmentation":
        _legend(draw, [(f"{i['label']} ({i['area']} px)", i["label_id"]) for i in result["classes"]], font)
    return canvas


def _legend(draw: ImageDraw.ImageDraw, lines: list[tuple[str, int]], font: Any) -> None:
    """One labelled box per (text, label_id) line, down the top-left corner."""
    y = 0.0
    for text, label_id in lines:
        box = draw.textbbox((0, 0), text, font=font)
        y += box[3] - box[1] + 6
        _label(draw, (0, y), text, colour(label_id), font)


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _masks(canvas: Image.Image, result: dict[str, Any]) -> Image.Image:
    """Blend every class's mask in its colour."""
    h, w = canvas.height, canvas.width
    label_map = np.zeros((h, w), np.int32) - 1
    if "mask_png" in result:
        cmap = _png(result["mask_png"]).astype(np.int32)
        label_map = np.where(cmap > 0, cmap, -1)
    for item in result["classes"]:
        if "rle" in item:
            from pycocotools import mask as mask_utils

            rle = {"size": item["rle"]["size"], "counts": item["rle"]["counts"].encode("ascii")}
            label_map[mask_utils.decode(rle).astype(bool)] = item["label_id"]
        elif "polygons" in item:
            layer = Image.new("L", (w, h), 0)
            for poly in item["polygons"]:
                ImageDraw.Draw(layer).polygon(poly, fill=255, outline=255)
            label_map[np.asarray(layer) > 0] = item["label_id"]
    rgb = np.asarray(canvas).astype(np.float32)
    overlay = rgb.copy()
    for label_id in np.unique(label_map[label_map >= 0]):
        overlay[label_map == label_id] = colour(int(label_id))
    blended = np.where((label_map >= 0)[..., None], rgb * (1 - MASK_ALPHA) + overlay * MASK_ALPHA, rgb)
    return Image.fromarray(np.round(blended).astype(np.uint8), "RGB")


def _heatmap(canvas: Image.Image, heat: np.ndarray) -> Image.Image:
    """Blend a uint8 heatmap over the image (core.postprocess.blend_heatmap)."""
    from core.postprocess import blend_heatmap

    return Image.fromarray(blend_heatmap(np.asarray(canvas), heat / 255.0), "RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    """``image`` as PNG or JPEG (quality 90) bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
