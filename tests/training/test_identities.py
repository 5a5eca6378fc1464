"""Synthetic identities (training.identities): reproducible ImageFolder trees of views, identities
that share shapes and colours yet never look alike, and views told apart by their pixels."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from core.datasets import ImageFolder
from tests.support.files import tree_digest
from training.identities import (
    DOT_RADIUS,
    MARK_KINDS,
    RADIUS_BUDGET,
    RING_INNER,
    RING_OUTER,
    SCALE_JITTER,
    SIZES,
    STRIPE_HALF_WIDTH,
    Mark,
    main,
    make_identities,
    too_alike,
    write_identities,
)
from training.synthetic import SHAPES


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("identities")
    write_identities(out, 50, 4, seed=7)
    return out


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_identities(tmp_path: Path) -> None:
    write_identities(tmp_path / "a", 6, 3, seed=3)
    write_identities(tmp_path / "b", 6, 3, seed=3)
    write_identities(tmp_path / "c", 6, 3, seed=4)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    first, other = ([{k: v for k, v in d.items() if k != "name"}
                     for d in json.loads((tmp_path / x / "identities.json").read_text())["identities"]] for x in "ac")
    assert not any(d in other for d in first), "another seed must give other identities"
    assert make_identities(30, 3) == make_identities(30, 3)
    assert make_identities(12, 3) == make_identities(30, 3)[:12]  # a longer list starts with a shorter one
    assert not set(make_identities(30, 3)) & set(make_identities(30, 4))


def test_imagefolder_layout(tmp_path: Path) -> None:
    write_identities(tmp_path, 7, 3, seed=0, size=80)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == [f"id-{i:05d}" for i in range(7)]
    for name in folders:
        files = sorted((tmp_path / name).iterdir())
        assert [f.name for f in files] == ["0000.png", "0001.png", "0002.png"]
        for f in files:
            with Image.open(f) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (80, 80))
    dataset = ImageFolder(tmp_path)  # the trainer's reader: identities.json at the root is no class
    assert dataset.classes == folders and len(dataset.samples) == 21
    doc = json.loads((tmp_path / "identities.json").read_text())
    assert [d["name"] for d in doc["identities"]] == folders
    assert doc["seed"] == 0 and doc["views"] == 3 and doc["size"] == 80


def test_identities_are_pairwise_distinct() -> None:
    ids = make_identities(300, seed=0)
    assert len(set(ids)) == 300
    assert not any(too_alike(a, b) for a, b in itertools.combinations(ids, 2))
    for ident in ids:
        assert ident.shape in SHAPES and SIZES[0] <= ident.size <= SIZES[1]
        assert 1 <= len(ident.marks) <= 3 and sum(m.kind == "stripe" for m in ident.marks) <= 1
        assert all(m.kind in MARK_KINDS and math.dist(m.colour, ident.colour) >= 80 for m in ident.marks)
    # too_alike itself: a copy a little lighter is too alike; another kind of mark, or another shape, is not.
    a = next(i for i in ids if i.marks[0].kind == "dot" and max(i.colour) < 240)
    lighter = dataclasses.replace(a, colour=tuple(c + 10 for c in a.colour), size=min(a.size + 0.1, 0.95))
    assert too_alike(a, lighter)
    ringed = dataclasses.replace(a, marks=(Mark("ring", a.marks[0].x, a.marks[0].y, 0.0, a.marks[0].colour),
                                           *a.marks[1:]))
    assert not too_alike(a, ringed)
    assert not too_alike(a, dataclasses.replace(a, shape=next(s for s in SHAPES if s != a.shape)))


def test_class_labels_do_not_suffice() -> None:
    """In a set of 50, every shape is worn by several identities, and some identities of one shape
    have close body colours: neither the shape nor the colour names an individual."""
    ids = make_identities(50, seed=0)
    per_shape = Counter(i.shape for i in ids)
    assert set(per_shape) == set(SHAPES) and min(per_shape.values()) >= 4, per_shape
    twins = [(a, b) for a, b in itertools.combinations(ids, 2)
             if a.shape == b.shape and math.dist(a.colour, b.colour) < 40]
    assert len(twins) >= 3, "expected some identities of one shape and close colour"
    assert all(a.marks != b.marks for a, b in twins)  # what tells them apart


def test_marks_are_at_least_3_px_at_96_px() -> None:
    smallest = SIZES[0] * (1 - SCALE_JITTER) * RADIUS_BUDGET * 96  # the smallest object's radius, pixels
    assert 2 * DOT_RADIUS * smallest >= 3 and 2 * STRIPE_HALF_WIDTH * smallest >= 3
    assert (RING_OUTER - RING_INNER) * smallest >= 2.5 and 2 * RING_INNER * smallest >= 3


def test_views_of_one_identity_differ(written: Path) -> None:
    for folder in sorted(p for p in written.iterdir() if p.is_dir()):
        views = [_pixels(f).astype(np.int16) for f in sorted(folder.glob("*.png"))]
        assert len(views) == 4
        for a, b in itertools.combinations(views, 2):
            assert np.abs(a - b).mean() > 10, f"two views of {folder.name} are nearly the same pixels"


def _body_colour(pixels: np.ndarray) -> np.ndarray:
    """The object's body colour read from the pixels alone: the background is noisy and the body is
    flat, so the commonest colour among pixels whose 3x3 neighbourhood is all one colour."""
    p = pixels.astype(np.int16)
    centre = p[1:-1, 1:-1]
    flat = (sliding_window_view(p, (3, 3), axis=(0, 1)) == centre[..., None, None]).all(axis=(2, 3, 4))
    assert flat.sum() >= 20, "no flat body found"
    colours, counts = np.unique(centre[flat], axis=0, return_counts=True)
    return colours[counts.argmax()].astype(np.float64)


def test_object_colour_is_nearer_its_own_views_than_other_coloured_identities(written: Path) -> None:
    doc = json.loads((written / "identities.json").read_text())
    measured = [np.stack([_body_colour(_pixels(f)) for f in sorted((written / d["name"]).glob("*.png"))])
                for d in doc["identities"]]
    checked = 0
    for i, d in enumerate(doc["identities"]):
        # which identities count as "of another colour" comes from the attributes; every distance from pixels
        others = [m.mean(axis=0) for e, m in zip(doc["identities"], measured)
                  if math.dist(d["colour"], e["colour"]) > 150]
        assert len(others) >= 10
        for v, colour in enumerate(measured[i]):
            own = np.delete(measured[i], v, axis=0).mean(axis=0)  # the identity's other views
            nearest_other = min(np.linalg.norm(colour - o) for o in others)
            assert np.linalg.norm(colour - own) < 0.75 * nearest_other, (d["name"], v)
            checked += 1
    assert checked == 200


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path), "--identities", "3", "--views", "2", "--seed", "5", "--size", "64"])
    assert "3 identities x 2 views" in capsys.readouterr().out
    assert len(list(tmp_path.glob("id-*/*.png"))) == 6
