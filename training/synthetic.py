"""Deterministic synthetic scenes of coloured shapes, written in standard on-disk formats.

A scene is a textured background with one or more filled shapes (circle, square, triangle,
hexagon, star) of random colour, size, rotation and position; later shapes occlude earlier
ones. The same seed always gives the same files. Three writers produce what real datasets
look like on disk, so a user's own data in these formats trains with the same commands:

- classification: an ImageFolder tree ``<out>/<class>/<n>.jpg`` (one shape per image);
- detection: COCO instances JSON ``<out>/annotations.json`` + ``<out>/images/``;
- instance_segmentation: the same format, scenes where shapes of one or two classes touch
  and overlap (crowds that only per-object masks tell apart);
- segmentation: ``<out>/images/<n>.jpg`` + ``<out>/masks/<n>.png`` (class index per pixel,
  0 = background) + ``<out>/classes.txt`` (one name a line, background first).

Usage::

    python -m training.synthetic classification --out data/cls/train --count 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "hexagon", "star")
BACKGROUND = "background"


@dataclass
class Instance:
    """One shape in a scene: its class id (index into SHAPES) and visible pixel mask."""

    class_id: int
    mask: np.ndarray  # bool HxW, visible pixels only (after occlusion)

    @property
    def bbox_xyxy(self) -> tuple[float, float, float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@dataclass
class Scene:
    image: Image.Image
    instances: list[Instance]

    def semantic_mask(self) -> np.ndarray:
        """Class-index map (uint8): 0 background, shape k -> k + 1."""
        out = np.zeros((self.image.height, self.image.width), np.uint8)
        for inst in self.instances:
            out[inst.mask] = inst.class_id + 1
        return out


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth two-colour gradient with noise and a few faint clutter strokes."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle))
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    img += rng.normal(0, 8, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 6))):
        pts = [tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2)]
        col = tuple(int(v) for v in np.clip(np.array(pil.getpixel(pts[0])) + rng.integers(-40, 40, 3), 0, 255))
        draw.line(pts, fill=col, width=int(rng.integers(1, 4)))
    return pil


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if kind == "square":
        n, radii = 4, [r]
    elif kind == "triangle":
        n, radii = 3, [r]
    elif kind == "hexagon":
        n, radii = 6, [r]
    elif kind == "star":
        n, radii = 10, [r, r * 0.45]
    else:
        raise ValueError(kind)
    pts = []
    for i in range(n):
        a = rot + 2 * math.pi * i / n
        rr = radii[i % len(radii)]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _contrasting_colour(rng: np.random.Generator, background: Image.Image, cx: float, cy: float
                        ) -> tuple[int, int, int]:
    """A random colour at least 90 (L1/3) away from the background under the centre."""
    bg = np.array(background.getpixel((int(cx), int(cy))), np.float32)
    for _ in range(50):
        col = rng.integers(0, 256, 3)
        if np.abs(col - bg).mean() > 90:
            break
    return tuple(int(v) for v in col)


def _draw_shape(img: Image.Image, rng: np.random.Generator, kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Draw one filled shape on img in place and return its full (pre-occlusion) mask."""
    mask_img = Image.new("L", img.size, 0)
    md = ImageDraw.Draw(mask_img)
    if kind == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        md.ellipse(box, fill=255)
    else:
        md.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    colour = _contrasting_colour(rng, img, cx, cy)
    fill = Image.new("RGB", img.size, colour)
    img.paste(fill, (0, 0), mask_img)
    return np.array(mask_img) > 127


def render_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    n_shapes: int,
    min_radius: float,
    max_radius: float,
    class_ids: list[int] | None = None,
    cluster: bool = False,
) -> Scene:
    """Render one scene; shapes drawn later occlude earlier ones (masks are visible parts).
    ``cluster``: each shape is placed touching or overlapping one drawn before it (crowds of
    one class: what only instance segmentation tells apart)."""
    img = _background(rng, width, height)
    full_masks: list[tuple[int, np.ndarray]] = []
    placed: list[tuple[float, float, float]] = []
    for i in range(n_shapes):
        cid = int(class_ids[i]) if class_ids is not None else int(rng.integers(0, len(SHAPES)))
        r = rng.uniform(min_radius, max_radius)
        if cluster and placed:
            px, py, pr = placed[int(rng.integers(0, len(placed)))]
            angle, reach = rng.uniform(0, 2 * math.pi), rng.uniform(0.7, 1.4) * (r + pr)
            cx = float(np.clip(px + reach * math.cos(angle), r * 0.6, width - r * 0.6))
            cy = float(np.clip(py + reach * math.sin(angle), r * 0.6, height - r * 0.6))
        else:
            cx = rng.uniform(r * 0.6, width - r * 0.6)
            cy = rng.uniform(r * 0.6, height - r * 0.6)
        placed.append((cx, cy, r))
        full_masks.append((cid, _draw_shape(img, rng, SHAPES[cid], cx, cy, r)))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    instances: list[Instance] = []
    covered = np.zeros((height, width), bool)
    for cid, m in reversed(full_masks):
        visible = m & ~covered
        covered |= m
        if visible.sum() >= 0.4 * max(m.sum(), 1) and visible.sum() >= 30:
            instances.append(Instance(cid, visible))
    instances.reverse()
    return Scene(img, instances)


def _scene_size(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def write_classification(out: Path, count: int, seed: int) -> None:
    """ImageFolder tree: one centred-ish shape per image, balanced classes."""
    rng = np.random.default_rng(seed)
    for name in SHAPES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cid = i % len(SHAPES)
        w, h = _scene_size(rng, 96, 192)
        m = min(w, h)
        scene = render_scene(rng, w, h, 1, 0.2 * m, 0.42 * m, class_ids=[cid])
        scene.image.save(out / SHAPES[cid] / f"{i:06d}.jpg", quality=int(rng.integers(70, 96)))


def write_segmentation(out: Path, count: int, seed: int) -> None:
    """Image + class-index PNG pairs and classes.txt (background first)."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join((BACKGROUND, *SHAPES)) + "\n")
    for i in range(count):
        w, h = _scene_size(rng, 160, 256)
        m = min(w, h)
        scene = render_scene(rng, w, h, int(rng.integers(1, 5)), 0.08 * m, 0.25 * m)
        scene.image.save(out / "images" / f"{i:06d}.jpg", quality=92)
        Image.fromarray(scene.semantic_mask(), "L").save(out / "masks" / f"{i:06d}.png")


def write_detection(out: Path, count: int, seed: int, crowds: bool = False) -> None:
    """COCO instances JSON with RLE masks (pycocotools) for every visible shape. ``crowds``:
    scenes of one or two classes whose shapes touch and overlap (:func:`render_scene`'s
    ``cluster``), the instance segmentation data."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        w, h = _scene_size(rng, 192, 320)
        m = min(w, h)
        n = int(rng.integers(1, 7))
        kinds = rng.choice(len(SHAPES), size=int(rng.integers(1, 3)), replace=False) if crowds else None
        scene = render_scene(rng, w, h, n, 0.06 * m, 0.2 * m, cluster=crowds,
                             class_ids=None if kinds is None else [int(rng.choice(kinds)) for _ in range(n)])
        fname = f"{i:06d}.jpg"
        scene.image.save(out / "images" / fname, quality=92)
        images.append({"id": i + 1, "file_name": fname, "width": w, "height": h})
        for inst in scene.instances:
            x1, y1, x2, y2 = inst.bbox_xyxy
            rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": inst.class_id + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(inst.mask.sum()),
                "iscrowd": 0, "segmentation": rle,
            })
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SHAPES)]
    doc = {"images": images, "annotations": annotations, "categories": categories,
           "info": {"description": f"convserve synthetic shapes, seed {seed}"}}
    (out / "annotations.json").write_text(json.dumps(doc))


def write_instances(out: Path, count: int, seed: int) -> None:
    """Instance segmentation: :func:`write_detection`'s format, scenes of touching crowds."""
    write_detection(out, count, seed, crowds=True)


WRITERS = {
    "classification": write_classification,
    "detection": write_detection,
    "segmentation": write_segmentation,
    "instance_segmentation": write_instances,
}
# Posed figures with keypoints: training.figures (python -m training.figures), which draws on this module.


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(WRITERS))
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--count", type=int, default=1000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    a = p.parse_args(argv)
    WRITERS[a.task](a.out, a.count, a.seed)
    print(f"wrote {a.count} {a.task} images to {a.out}")


if __name__ == "__main__":
    main()
