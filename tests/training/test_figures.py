"""Synthetic posed figures (training.figures): COCO person_keypoints files pycocotools reads,
annotations that agree with the pixels, and scoring by pycocotools' own keypoint OKS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.metrics import coco_keypoint_metrics, load_coco
from training.figures import FLIP, KEYPOINTS, SIGMAS, SKELETON, render_figures, write_keypoints


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("figures")
    write_keypoints(out, 24, seed=5)
    return out


def test_the_same_seed_writes_the_same_files(figures: Path, tmp_path: Path) -> None:
    write_keypoints(tmp_path, 24, seed=5)
    assert (tmp_path / "annotations.json").read_text() == (figures / "annotations.json").read_text()


def test_pycocotools_reads_the_keypoint_annotations(figures: Path) -> None:
    coco = load_coco(str(figures / "annotations.json"))
    (category,) = coco.loadCats(coco.getCatIds())
    assert category["keypoints"] == list(KEYPOINTS) and len(category["sigmas"]) == len(KEYPOINTS)
    assert all(1 <= i <= len(KEYPOINTS) for edge in category["skeleton"] for i in edge)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 24
    for a in anns:
        kp = np.array(a["keypoints"]).reshape(-1, 3)
        assert kp.shape == (len(KEYPOINTS), 3) and a["num_keypoints"] == int((kp[:, 2] > 0).sum()) >= 3
        assert set(kp[:, 2].tolist()) <= {0.0, 1.0, 2.0}
        x, y, w, h = a["bbox"]
        seen = kp[kp[:, 2] > 0]
        assert (seen[:, 0] >= x - 1).all() and (seen[:, 0] <= x + w + 1).all()  # joints inside the figure's box
        assert (seen[:, 1] >= y - 1).all() and (seen[:, 1] <= y + h + 1).all()
        assert coco.annToMask(a).sum() == a["area"]
    assert any((np.array(a["keypoints"]).reshape(-1, 3)[:, 2] == 1).any() for a in anns)  # some are occluded


def test_visible_keypoints_lie_on_their_figure_and_left_is_on_the_image_right() -> None:
    rng = np.random.default_rng(0)
    left, right = KEYPOINTS.index("left_shoulder"), KEYPOINTS.index("right_shoulder")
    checked = 0
    for _ in range(20):
        _, figs = render_figures(rng, 256, 224, 2, 2)
        for f in figs:
            for x, y, v in f.keypoints:
                if v == 2:
                    assert f.mask[int(y), int(x)], "a visible joint off its own silhouette"
                    checked += 1
            assert f.keypoints[left, 0] > f.keypoints[right, 0]  # facing the viewer, as COCO's people
    assert checked > 200


def test_flip_swaps_left_and_right_only() -> None:
    assert [KEYPOINTS[i] for i in FLIP] == [n.replace("left", "@").replace("right", "left").replace("@", "right")
                                            for n in KEYPOINTS]
    assert {a for e in SKELETON for a in e} == set(KEYPOINTS) and set(SIGMAS) == set(KEYPOINTS)


def _results(figures: Path, shift: float = 0.0) -> tuple[object, list[dict], list[int]]:
    coco = load_coco(str(figures / "annotations.json"))
    rng = np.random.default_rng(1)
    results = []
    for a in coco.loadAnns(coco.getAnnIds()):
        kp = np.array(a["keypoints"], np.float64).reshape(-1, 3)
        kp[:, :2] += rng.normal(0, shift, (len(kp), 2)) * np.sqrt(a["area"])
        kp[:, 2] = 1.0
        results.append({"image_id": a["image_id"], "category_id": 1, "keypoints": kp.ravel().tolist(), "score": 0.9})
    return coco, results, coco.getImgIds()


def test_keypoint_oks_ap_from_pycocotools(figures: Path) -> None:
    doc = json.loads((figures / "annotations.json").read_text())
    sigmas = doc["categories"][0]["sigmas"]
    coco, exact, ids = _results(figures)
    perfect = coco_keypoint_metrics(coco, exact, ids, sigmas)
    assert perfect["oks_ap"] == pytest.approx(1.0) and perfect["oks_ap_50"] == pytest.approx(1.0)
    coco, rough, ids = _results(figures, shift=0.08)
    worse = coco_keypoint_metrics(coco, rough, ids, sigmas)
    assert worse["oks_ap"] < 0.9 * perfect["oks_ap"] and worse["oks_ap_50"] <= perfect["oks_ap_50"]
    assert coco_keypoint_metrics(coco, [], ids, sigmas)["oks_ap"] == 0.0


def test_the_coco_reader_takes_keypoints_skeleton_and_sigmas(figures: Path) -> None:
    from core.datasets import CocoDetection

    data = CocoDetection(figures)
    assert data.keypoint_names == list(KEYPOINTS) and data.sigmas == [SIGMAS[n] for n in KEYPOINTS]
    assert data.skeleton == [(KEYPOINTS.index(a), KEYPOINTS.index(b)) for a, b in SKELETON]
    doc = json.loads((figures / "annotations.json").read_text())
    first = data.samples[0].target
    anns = [a for a in doc["annotations"] if a["image_id"] == first.image_id]
    assert first.keypoints.shape == (len(anns), len(KEYPOINTS), 3)
    np.testing.assert_allclose(first.keypoints.reshape(len(anns), -1), [a["keypoints"] for a in anns])


@pytest.mark.parametrize(("change", "message"), [
    (lambda doc: doc["annotations"][0].update(keypoints=[1, 2, 2]), "needs 'keypoints' of 39 numbers"),
    (lambda doc: doc["categories"][0].pop("sigmas"), "have no OKS sigma"),
    (lambda doc: doc["categories"][0].update(skeleton=[[0, 1]]), "1-based keypoint indices"),
    (lambda doc: doc["categories"][0].update(sigmas=[0.1]), "one positive number per keypoint"),
])
def test_malformed_keypoint_files_are_named(figures: Path, tmp_path: Path, change, message: str) -> None:
    import shutil

    from core.datasets import CocoDetection
    from core.errors import DatasetError

    shutil.copytree(figures / "images", tmp_path / "images")
    doc = json.loads((figures / "annotations.json").read_text())
    change(doc)
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=message):
        CocoDetection(tmp_path, verify=False)


def test_coco_person_keypoints_need_no_sigmas_of_their_own(figures: Path, tmp_path: Path) -> None:
    """Real COCO person_keypoints files carry no sigmas: COCO's names get pycocotools' own."""
    import shutil

    from core.datasets import COCO_KEYPOINT_SIGMAS, CocoDetection

    coco_names = list(COCO_KEYPOINT_SIGMAS)
    shutil.copytree(figures / "images", tmp_path / "images")
    doc = json.loads((figures / "annotations.json").read_text())
    doc["categories"] = [{"id": 1, "name": "person", "keypoints": coco_names, "skeleton": [[16, 14], [14, 12]]}]
    for a in doc["annotations"]:
        a["keypoints"] = [0] * 51
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    data = CocoDetection(tmp_path, verify=False)
    from pycocotools.cocoeval import Params

    assert data.sigmas == pytest.approx(list(Params(iouType="keypoints").kpt_oks_sigmas))
