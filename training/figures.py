"""Synthetic posed figures with COCO keypoint annotations, in the style of training.synthetic.

A figure is a stick figure with a head and 13 named keypoints (head, shoulders, elbows,
hands, hips, knees, feet), drawn as thick limbs in one colour at a random position, scale,
lean and pose (every limb's angle drawn at random within a plausible range). Figures of one
scene may overlap; shapes from training.synthetic are dropped over some of them. A keypoint
hidden by a later figure or a shape is annotated as COCO does for occluded joints
(``v = 1``, labelled, not visible), one outside the image is ``v = 0``. The figure faces the
viewer: its left side is on the image's right, as in COCO.

Written as COCO person_keypoints JSON, ``<out>/annotations.json`` + ``<out>/images/``: one
category ``figure`` listing ``keypoints`` (names) and ``skeleton`` (1-based edges, COCO's
convention), plus ``sigmas`` (the per-keypoint OKS constants; COCO's own for the joints they
share, an extension field pycocotools ignores), and per annotation ``keypoints``
([x, y, v] x 13), ``num_keypoints``, ``bbox``, ``area`` and ``segmentation`` (the figure's
whole silhouette as RLE, so the same files serve instance segmentation).

    python -m training.figures --out data/kp/train --count 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.datasets import keypoint_flip
from training.synthetic import SHAPES, _background, _draw_shape

KEYPOINTS: tuple[str, ...] = (
    "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_hand", "right_hand",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_foot", "right_foot",
)
# Limbs as keypoint-name pairs: what is drawn, and the skeleton in the annotations.
SKELETON: tuple[tuple[str, str], ...] = (
    ("head", "left_shoulder"), ("head", "right_shoulder"), ("left_shoulder", "right_shoulder"),
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_hand"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_hand"),
    ("left_shoulder", "left_hip"), ("right_shoulder", "right_hip"), ("left_hip", "right_hip"),
    ("left_hip", "left_knee"), ("left_knee", "left_foot"), ("right_hip", "right_knee"), ("right_knee", "right_foot"),
)
# COCO's OKS sigmas for the joints it shares (nose for the head, wrists for hands, ankles for feet).
SIGMAS: dict[str, float] = {
    "head": 0.026, "left_shoulder": 0.079, "right_shoulder": 0.079, "left_elbow": 0.072, "right_elbow": 0.072,
    "left_hand": 0.062, "right_hand": 0.062, "left_hip": 0.107, "right_hip": 0.107, "left_knee": 0.087,
    "right_knee": 0.087, "left_foot": 0.089, "right_foot": 0.089,
}
# Left <-> right: the keypoint a mirrored image's figure has in each slot.
FLIP: tuple[int, ...] = tuple(keypoint_flip(KEYPOINTS))
CATEGORY = "figure"


@dataclass
class Figure:
    """One drawn figure: keypoints [13, 3] (x, y, v as COCO), its whole silhouette, its box."""

    keypoints: np.ndarray   # float32 [13, 3]: x, y in pixels (pixel centres at +0.5), v in {0, 1, 2}
    mask: np.ndarray        # bool HxW, the whole figure (also where later things cover it)

    @property
    def bbox_xyxy(self) -> tuple[float, float, float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _pose(rng: np.random.Generator, cx: float, cy: float, height: float) -> dict[str, tuple[float, float]]:
    """Joint positions of a figure ``height`` pixels tall, hips centred at (cx, cy)."""
    lean = rng.uniform(-0.35, 0.35)  # radians from upright, the whole torso

    def at(origin: tuple[float, float], length: float, angle: float) -> tuple[float, float]:
        # angle 0 points down the image, positive turns towards the image's right
        return origin[0] + length * math.sin(angle), origin[1] + length * math.cos(angle)

    hip_mid = (cx, cy)
    neck = at(hip_mid, 0.32 * height, math.pi + lean)
    head = at(neck, 0.11 * height, math.pi + lean + rng.uniform(-0.3, 0.3))
    across = (math.cos(lean), -math.sin(lean))  # unit vector along the shoulders, towards the image's right
    half_shoulders, half_hips = 0.11 * height, 0.075 * height
    p = {"head": head,
         # facing the viewer: the figure's left is on the image's right
         "left_shoulder": (neck[0] + half_shoulders * across[0], neck[1] + half_shoulders * across[1]),
         "right_shoulder": (neck[0] - half_shoulders * across[0], neck[1] - half_shoulders * across[1]),
         "left_hip": (hip_mid[0] + half_hips * across[0], hip_mid[1] + half_hips * across[1]),
         "right_hip": (hip_mid[0] - half_hips * across[0], hip_mid[1] - half_hips * across[1])}
    for side, sign in (("left", 1.0), ("right", -1.0)):
        upper = lean + sign * rng.uniform(0.15, 2.6)           # arms: down by the side to raised
        p[f"{side}_elbow"] = at(p[f"{side}_shoulder"], 0.15 * height, upper)
        p[f"{side}_hand"] = at(p[f"{side}_elbow"], 0.14 * height, upper + sign * rng.uniform(-0.4, 1.6))
        thigh = lean + sign * rng.uniform(-0.05, 0.9)           # legs: straight down to a wide step
        p[f"{side}_knee"] = at(p[f"{side}_hip"], 0.22 * height, thigh)
        p[f"{side}_foot"] = at(p[f"{side}_knee"], 0.21 * height, thigh - sign * rng.uniform(0.0, 0.8))
    return p


def _draw_figure(size: tuple[int, int], joints: dict[str, tuple[float, float]], height: float,
                 colour: tuple[int, int, int], img: Image.Image) -> np.ndarray:
    """Draw the figure on ``img``; returns its silhouette mask."""
    layer = Image.new("L", size, 0)
    d_mask, d_img = ImageDraw.Draw(layer), ImageDraw.Draw(img)
    width = max(2, int(round(0.045 * height)))
    for a, b in SKELETON:
        if a == "head" or b == "head":
            continue
        for draw, fill in ((d_mask, 255), (d_img, colour)):
            draw.line([joints[a], joints[b]], fill=fill, width=width, joint="curve")
            for x, y in (joints[a], joints[b]):  # round ends
                draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=fill)
    neck = ((joints["left_shoulder"][0] + joints["right_shoulder"][0]) / 2,
            (joints["left_shoulder"][1] + joints["right_shoulder"][1]) / 2)
    hx, hy = joints["head"]
    r = 0.075 * height
    for draw, fill in ((d_mask, 255), (d_img, colour)):
        draw.line([neck, (hx, hy)], fill=fill, width=width)
        draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=fill)
    return np.asarray(layer) > 0


def render_figures(rng: np.random.Generator, width: int, height: int, n_figures: int, n_occluders: int
                   ) -> tuple[Image.Image, list[Figure]]:
    """One scene: ``n_figures`` figures (later ones in front), then ``n_occluders`` shapes on top."""
    img = _background(rng, width, height)
    drawn: list[tuple[np.ndarray, np.ndarray]] = []  # (keypoints [13, 2], silhouette)
    for _ in range(n_figures):
        tall = rng.uniform(0.45, 0.9) * height
        cx = rng.uniform(0.1 * width, 0.9 * width)
        cy = rng.uniform(0.35 * tall, height - 0.35 * tall)
        joints = _pose(rng, cx, cy, tall)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        mask = _draw_figure((width, height), joints, tall, colour, img)
        drawn.append((np.array([joints[n] for n in KEYPOINTS], np.float32), mask))
    covers: list[np.ndarray] = []
    for _ in range(n_occluders):
        r = rng.uniform(0.06, 0.14) * min(width, height)
        covers.append(_draw_shape(img, rng, SHAPES[int(rng.integers(0, len(SHAPES)))],
                                  rng.uniform(0, width), rng.uniform(0, height), r))
    figures = []
    for i, (points, mask) in enumerate(drawn):
        if not mask.any():
            continue
        in_front = [m for _, m in drawn[i + 1:]] + covers
        kp = np.zeros((len(KEYPOINTS), 3), np.float32)
        for k, (x, y) in enumerate(points):
            xi, yi = int(math.floor(x)), int(math.floor(y))
            if not (0 <= xi < width and 0 <= yi < height):
                continue  # outside the image: v = 0, x = y = 0
            hidden = any(m[yi, xi] for m in in_front)
            kp[k] = (x, y, 1 if hidden else 2)
        if (kp[:, 2] > 0).sum() >= 3:
            figures.append(Figure(kp, mask))
    return img, figures


def write_keypoints(out: Path, count: int, seed: int) -> None:
    """COCO person_keypoints-style JSON and images; see the module docstring."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        w, h = int(rng.integers(192, 321)), int(rng.integers(192, 321))
        img, figures = render_figures(rng, w, h, int(rng.integers(1, 4)), int(rng.integers(0, 3)))
        fname = f"{i:06d}.jpg"
        img.save(out / "images" / fname, quality=92)
        images.append({"id": i + 1, "file_name": fname, "width": w, "height": h})
        for fig in figures:
            x1, y1, x2, y2 = fig.bbox_xyxy
            rle = mask_utils.encode(np.asfortranarray(fig.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(fig.mask.sum()), "segmentation": rle,
                "keypoints": [round(float(v), 2) for v in fig.keypoints.ravel()],
                "num_keypoints": int((fig.keypoints[:, 2] > 0).sum()),
            })
    category = {"id": 1, "name": CATEGORY, "supercategory": CATEGORY, "keypoints": list(KEYPOINTS),
                "skeleton": [[KEYPOINTS.index(a) + 1, KEYPOINTS.index(b) + 1] for a, b in SKELETON],
                "sigmas": [SIGMAS[n] for n in KEYPOINTS]}
    doc = {"images": images, "annotations": annotations, "categories": [category],
           "info": {"description": f"convserve synthetic figures, seed {seed}"}}
    (out / "annotations.json").write_text(json.dumps(doc))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--count", type=int, default=1000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    a = p.parse_args(argv)
    write_keypoints(a.out, a.count, a.seed)
    print(f"wrote {a.count} keypoint images to {a.out}")


if __name__ == "__main__":
    main()
