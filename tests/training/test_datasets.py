import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.metrics import load_coco
from training.datasets import CocoDetectionDataset, DatasetError, ImageFolderDataset, SegmentationDataset


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_imagefolder_round_trip(tiny_data: Path) -> None:
    ds = ImageFolderDataset(tiny_data / "cls" / "train", (64, 64))
    assert ds.classes == sorted(p.name for p in (tiny_data / "cls" / "train").iterdir())
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (64, 64, 3)
    assert ds.samples[0].image.parent.name == ds.classes[label]


def test_coco_boxes_are_letterboxed_into_the_input(tiny_data: Path) -> None:
    root = tiny_data / "det" / "val"
    ds = CocoDetectionDataset(root, (128, 128))
    coco = load_coco(str(root / "annotations.json"))
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.shape == (128, 128, 3)
        info = coco.loadImgs(int(t["image_id"]))[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=int(t["image_id"])))
        want = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        want[:, 2:] += want[:, :2]
        s = min(128 / info["width"], 128 / info["height"])  # letterbox: one scale, content rounded to pixels
        want[:, [0, 2]] *= round(info["width"] * s) / info["width"]
        want[:, [1, 3]] *= round(info["height"] * s) / info["height"]
        np.testing.assert_allclose(t["boxes"].numpy(), want, atol=1e-3)
        assert [ds.classes[k] for k in t["labels"]] == [coco.cats[a["category_id"]]["name"] for a in anns]


def test_segmentation_round_trip(tiny_data: Path) -> None:
    ds = SegmentationDataset(tiny_data / "seg" / "val", (64, 80))
    img, mask = ds[0]
    assert img.shape == (64, 80, 3) and mask.shape == (64, 80) and mask.dtype == torch.int64
    assert int(mask.max()) < len(ds.classes)


def test_missing_class_folder_is_named(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data / "cls" / "val", tmp_path / "cls")
    shutil.rmtree(root / "star")
    with pytest.raises(DatasetError, match=r"missing class folder.*star"):
        ImageFolderDataset(root, (64, 64), classes=["circle", "square", "triangle", "hexagon", "star"])


def test_corrupt_image_is_named(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data / "cls" / "val", tmp_path / "cls")
    bad = next((root / "circle").iterdir())
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DatasetError, match=str(bad)):
        ImageFolderDataset(root, (64, 64))


def test_out_of_range_mask_is_named(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data / "seg" / "val", tmp_path / "seg")
    mask_path = sorted((root / "masks").iterdir())[2]
    m = np.array(Image.open(mask_path))
    m[0, 0] = 9
    Image.fromarray(m).save(mask_path)
    with pytest.raises(DatasetError, match=rf"{mask_path}.*class id 9 out of range"):
        SegmentationDataset(root, (64, 64))


def test_missing_mask_is_named(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data / "seg" / "val", tmp_path / "seg")
    victim = sorted((root / "masks").iterdir())[0]
    victim.unlink()
    with pytest.raises(DatasetError, match=str(victim)):
        SegmentationDataset(root, (64, 64))


def test_coco_unknown_category_and_missing_image(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data / "det" / "val", tmp_path / "det")
    doc = json.loads((root / "annotations.json").read_text())
    doc["annotations"][0]["category_id"] = 99
    (root / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="unknown category_id 99"):
        CocoDetectionDataset(root, (64, 64))
    doc["annotations"][0]["category_id"] = 1
    (root / "annotations.json").write_text(json.dumps(doc))
    gone = root / "images" / doc["images"][1]["file_name"]
    gone.unlink()
    with pytest.raises(DatasetError, match=str(gone)):
        CocoDetectionDataset(root, (64, 64))


@pytest.mark.slow  # the training CLI in a subprocess
def test_train_cli_reports_dataset_errors_cleanly(tiny_data: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = _copy(tiny_data / "cls" / "val", tmp_path / "cls")
    bad = next((root / "square").iterdir())
    bad.write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "training.train", "classification", "--train", str(root),
                        "--val", str(root), "--out", str(tmp_path / "run"), "--epochs", "1"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2
    assert f"dataset error: {bad}" in r.stderr
    assert "Traceback" not in r.stderr



@pytest.mark.slow
def test_training_with_loader_workers_under_spawn(tiny_data: Path, tmp_path: Path) -> None:
    """train()'s DataLoader workers start under the spawn start method (their init function
    must pickle): one step with one worker, in a fresh interpreter set to spawn."""
    import subprocess
    import sys

    code = f"""
import multiprocessing as mp
mp.set_start_method("spawn")
from training.train import TrainConfig, train
cfg = TrainConfig(task="classification", train={str(tiny_data / "cls" / "train")!r},
                  val={str(tiny_data / "cls" / "val")!r},
                  arch="mobilenet_v3_small", size=32, width_mult=0.5, epochs=1, batch_size=8, workers=1, max_steps=1)
print(sorted(train(cfg, __import__("pathlib").Path({str(tmp_path / "run")!r}))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'top1'" in r.stdout.splitlines()[-1]
