"""Deterministic synthetic identities (individual objects) for similarity (metric) learning.

An identity is one specific object: a shape from training.synthetic, a body colour, a size
and 1-3 small marks (dots, rings, a stripe) painted on the body at fixed places in the
object's own frame, so they turn and scale with it. Each image is one view of an identity:
a random textured background, any rotation, a random position (the object kept wholly in
the frame), about +-15% scale, brightness and contrast, and now and then a slight blur.
Views are never mirrored: a mirrored identity is a different object.

Why identities rather than classes: a Siamese or triplet embedding must tell individuals
apart, and individuals share a class. Here many identities share a shape, and many a
colour (bodies and marks take one of a dozen base colours, slightly varied); only the
combination of shape, colour, size and marks tells one from another. No two identities
have the same shape, the same kinds of mark and close body and mark colours. Another seed
gives other identities: the held-out set of unseen identities.

Written as an ImageFolder tree, one folder per identity: ``<out>/id-00000/0000.png`` ...
(PNG: lossless, the small marks matter) plus ``<out>/identities.json`` (each identity's
attributes, for humans; training does not read it).

Usage::

    python -m training.identities --out data/ids/train --identities 200 --views 8 --seed 0 --size 96
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.synthetic import SHAPES, _background, _polygon

# Base colours of bodies and marks (each identity's is one of these, varied a little).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (200, 40, 40), (235, 130, 30), (230, 210, 40), (50, 160, 60), (30, 150, 150), (40, 80, 200),
    (130, 60, 170), (235, 120, 175), (120, 75, 40), (235, 235, 235), (128, 128, 128), (25, 25, 25),
)
MARK_KINDS: tuple[str, ...] = ("dot", "ring", "stripe")
SIZES = (0.6, 0.95)        # an identity's size: its radius over the view's radius budget
RADIUS_BUDGET = 0.44       # the view's radius budget, a fraction of the image side
SCALE_JITTER = 0.15        # per view: radius x U(1 - j, 1 + j)
LIGHT_JITTER = 0.15        # per view: brightness and contrast x U(1 - j, 1 + j)
BLUR_P = 0.25              # per view: chance of a slight blur
# Mark sizes in units of the object's radius (at 96 px the smallest object has a radius of 21 px:
# dots 6 px across, rings 2.8 px thick round a 4 px hole, stripes 4 px wide).
DOT_RADIUS, RING_OUTER, RING_INNER, STRIPE_HALF_WIDTH = 0.15, 0.23, 0.10, 0.09
MARK_MARGIN = 0.05         # between a mark and the body's edge or another mark
ALIKE_COLOUR = 80.0        # colours nearer than this (RGB Euclidean) count as the same
SUPERSAMPLE = 2            # objects are drawn at this scale and reduced: smooth edges


@dataclass(frozen=True)
class Mark:
    """A small mark on an identity's body, in the object's frame (its radius is 1, x right, y down).

    ``angle`` (degrees) is a stripe's direction; dots and rings have 0."""

    kind: str
    x: float
    y: float
    angle: float
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class Identity:
    """The fixed attributes of one individual object."""

    shape: str                       # one of training.synthetic.SHAPES
    colour: tuple[int, int, int]     # body colour
    size: float                      # radius over the view's radius budget (SIZES)
    marks: tuple[Mark, ...]          # 1-3, stripes first (drawing order)


def identity_name(index: int) -> str:
    """The folder name of identity ``index``: ``id-00000``."""
    return f"id-{index:05d}"


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def _jittered(rng: np.random.Generator, base: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in base)


def _outline(shape: str) -> list[tuple[float, float]] | None:
    """The body's outline in the object frame (radius 1, unrotated); None for the circle."""
    return None if shape == "circle" else _polygon(shape, 0.0, 0.0, 1.0, 0.0)


def _room(outline: list[tuple[float, float]] | None, x: float, y: float) -> float:
    """How far (x, y) lies inside the body: distance to the outline, negative outside."""
    if outline is None:
        return 1.0 - math.hypot(x, y)
    inside, nearest = False, math.inf
    for (x1, y1), (x2, y2) in zip(outline, outline[1:] + outline[:1]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
        dx, dy = x2 - x1, y2 - y1
        t = min(1.0, max(0.0, ((x - x1) * dx + (y - y1) * dy) / (dx * dx + dy * dy)))
        nearest = min(nearest, math.hypot(x - x1 - t * dx, y - y1 - t * dy))
    return nearest if inside else -nearest


def _mark_radius(kind: str) -> float:
    return DOT_RADIUS if kind == "dot" else RING_OUTER


def _make_marks(rng: np.random.Generator, shape: str, body: tuple[int, int, int]) -> tuple[Mark, ...]:
    """1-3 marks, at most one stripe, in colours far from the body; dots and rings placed wholly
    on the body, clear of each other and of the stripe (one that finds no room is left out)."""
    kinds = [MARK_KINDS[int(i)] for i in rng.integers(0, len(MARK_KINDS), int(rng.integers(1, 4)))]
    if kinds.count("stripe") > 1:
        kinds = ["stripe"] + [k for k in kinds if k != "stripe"] + ["dot"] * (kinds.count("stripe") - 1)
    kinds.sort(key=lambda k: k != "stripe")
    far = [c for c in PALETTE if _distance(c, body) >= 120]
    outline = _outline(shape)
    marks: list[Mark] = []
    for kind in kinds:
        colour = _jittered(rng, far[int(rng.integers(0, len(far)))], 15)
        if kind == "stripe":
            angle = float(rng.uniform(0, 180))
            offset = float(rng.uniform(-0.2, 0.2))  # the centre line's distance from the centre
            a = math.radians(angle)
            marks.append(Mark(kind, round(-offset * math.sin(a), 3), round(offset * math.cos(a), 3),
                              round(angle, 1), colour))
            continue
        r = _mark_radius(kind)
        for _ in range(300):
            x, y = (float(v) for v in rng.uniform(-1, 1, 2))
            if _room(outline, x, y) < r + MARK_MARGIN:
                continue
            if all(_clear(m, x, y, r) for m in marks):
                marks.append(Mark(kind, round(x, 3), round(y, 3), 0.0, colour))
                break
    return tuple(marks)


def _clear(mark: Mark, x: float, y: float, r: float) -> bool:
    """Whether a dot or ring of radius r at (x, y) keeps clear of ``mark``."""
    if mark.kind == "stripe":
        a = math.radians(mark.angle)
        across = abs(-(x - mark.x) * math.sin(a) + (y - mark.y) * math.cos(a))
        return across >= STRIPE_HALF_WIDTH + r + MARK_MARGIN
    return math.hypot(x - mark.x, y - mark.y) >= _mark_radius(mark.kind) + r + 2 * MARK_MARGIN


def too_alike(a: Identity, b: Identity) -> bool:
    """Whether two identities could be taken for one another: the same shape, the same kinds of
    mark, and body and mark colours all alike (ALIKE_COLOUR). Size and mark positions are not
    trusted to tell them apart: views vary the scale, and a turned view moves the marks."""
    if a.shape != b.shape or sorted(m.kind for m in a.marks) != sorted(m.kind for m in b.marks):
        return False
    if _distance(a.colour, b.colour) >= ALIKE_COLOUR:
        return False
    return any(all(m.kind == n.kind and _distance(m.colour, n.colour) < ALIKE_COLOUR for m, n in zip(a.marks, p))
               for p in itertools.permutations(b.marks))


def make_identities(count: int, seed: int) -> list[Identity]:
    """``count`` identities, none too alike (:func:`too_alike`); the same seed gives the same list,
    and a longer list starts with a shorter one."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    out: list[Identity] = []
    while len(out) < count:
        for _ in range(1000):
            shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
            colour = _jittered(rng, PALETTE[int(rng.integers(0, len(PALETTE)))], 25)
            size = round(float(rng.uniform(*SIZES)), 3)
            candidate = Identity(shape, colour, size, _make_marks(rng, shape, colour))
            if not any(too_alike(candidate, other) for other in out):
                out.append(candidate)
                break
        else:
            raise ValueError(f"could not find {count} distinct identities (found {len(out)})")
    return out


def render_view(identity: Identity, rng: np.random.Generator, size: int) -> Image.Image:
    """One random view of ``identity``: an RGB image ``size`` x ``size``."""
    theta = rng.uniform(0, 2 * math.pi)
    radius = identity.size * RADIUS_BUDGET * size * rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
    radius = min(radius, size / 2 - 1)
    cx, cy = (float(v) for v in rng.uniform(radius + 0.5, size - radius - 0.5, 2))
    cos, sin, k = math.cos(theta), math.sin(theta), SUPERSAMPLE

    def at(u: float, v: float) -> tuple[float, float]:  # object frame -> supersampled layer pixels
        return k * (cx + radius * (u * cos - v * sin)), k * (cy + radius * (u * sin + v * cos))

    def disc(draw: ImageDraw.ImageDraw, u: float, v: float, r: float, fill: tuple[int, int, int] | int) -> None:
        x, y = at(u, v)
        draw.ellipse([x - k * radius * r, y - k * radius * r, x + k * radius * r, y + k * radius * r], fill=fill)

    # The object on its own layer: the body colour everywhere, marks painted on it, and the body's
    # shape as the alpha, which trims marks (a stripe) at the body's edge.
    big = (k * size, k * size)
    layer, alpha = Image.new("RGB", big, identity.colour), Image.new("L", big, 0)
    draw, draw_alpha = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
    outline = _outline(identity.shape)
    if outline is None:
        disc(draw_alpha, 0.0, 0.0, 1.0, 255)
    else:
        draw_alpha.polygon([at(u, v) for u, v in outline], fill=255)
    for m in identity.marks:
        if m.kind == "stripe":
            a = math.radians(m.angle)
            du, dv = 1.5 * math.cos(a), 1.5 * math.sin(a)                                 # along
            nu, nv = -STRIPE_HALF_WIDTH * math.sin(a), STRIPE_HALF_WIDTH * math.cos(a)  # across
            draw.polygon([at(m.x + su * du + sn * nu, m.y + su * dv + sn * nv)
                          for su, sn in ((-1, -1), (1, -1), (1, 1), (-1, 1))], fill=m.colour)
        elif m.kind == "ring":
            disc(draw, m.x, m.y, RING_OUTER, m.colour)
            disc(draw, m.x, m.y, RING_INNER, identity.colour)
        else:
            disc(draw, m.x, m.y, DOT_RADIUS, m.colour)
    layer, alpha = layer.reduce(k), alpha.reduce(k)

    # A background that stands apart from the body (the best of a few tries).
    covered = np.asarray(alpha) > 127
    best, best_contrast = None, -1.0
    for _ in range(8):
        background = _background(rng, size, size)
        under = np.asarray(background, np.float32)[covered]
        contrast = float(np.median(np.abs(under - np.array(identity.colour, np.float32)).mean(axis=1)))
        if contrast > best_contrast:
            best, best_contrast = background, contrast
        if contrast >= 50:
            break
    img = best
    img.paste(layer, (0, 0), alpha)

    if rng.random() < BLUR_P:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 0.9))))
    contrast_gain = rng.uniform(1 - LIGHT_JITTER, 1 + LIGHT_JITTER)
    brightness = rng.uniform(1 - LIGHT_JITTER, 1 + LIGHT_JITTER)
    pixels = np.asarray(img, np.float32)
    pixels = ((pixels - pixels.mean()) * contrast_gain + pixels.mean()) * brightness
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def write_identities(out: Path, identities: int, views: int, seed: int, size: int = 96) -> None:
    """ImageFolder tree ``<out>/id-00000/0000.png`` ... (``views`` per identity) and
    ``<out>/identities.json``. Identities and each identity's views come from separate streams
    of ``seed``: the same seed writes the same files, and more views leave the first ones as they were."""
    out.mkdir(parents=True, exist_ok=True)
    made = make_identities(identities, seed)
    for i, identity in enumerate(made):
        folder = out / identity_name(i)
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, i)))
        for v in range(views):
            render_view(identity, rng, size).save(folder / f"{v:04d}.png")
    about = {"seed": seed, "size": size, "views": views,
             "frame": "marks: x, y in units of the object's radius (x right, y down before a view turns it), "
                      "angle in degrees; size: radius over the view's radius budget "
                      f"({RADIUS_BUDGET} x the image side)"}
    rows = [json.dumps({"name": identity_name(i), **asdict(identity)}) for i, identity in enumerate(made)]
    header = "".join(f" {json.dumps(key)}: {json.dumps(value)},\n" for key, value in about.items())
    (out / "identities.json").write_text("{\n" + header + ' "identities": [\n  ' + ",\n  ".join(rows) + "\n ]\n}\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--identities", type=int, default=200, help="number of identities (folders)")
    p.add_argument("--views", type=int, default=8, help="views (images) per identity")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: same seed, same files; another seed, other identities")
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    a = p.parse_args(argv)
    write_identities(a.out, a.identities, a.views, a.seed, a.size)
    print(f"wrote {a.identities} identities x {a.views} views ({a.identities * a.views} images, "
          f"{a.size} px) to {a.out}")


if __name__ == "__main__":
    main()
