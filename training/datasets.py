"""Loaders for the three on-disk formats, validated up front with errors that name files.

- :class:`ImageFolderDataset`: ``<root>/<class>/<image>`` (torchvision ImageFolder layout).
- :class:`CocoDetectionDataset`: ``<root>/annotations.json`` (COCO instances) + ``<root>/images/``.
- :class:`SegmentationDataset`: ``<root>/images/<stem>.*`` + ``<root>/masks/<stem>.png``
  (class index per pixel) + ``<root>/classes.txt`` (background first).

Every item is already at the model's input size as uint8 HWC, prepared with
:func:`service.preprocess.prepare` (the service's own resize), so training sees exactly what
serving feeds. Normalisation happens inside the model (see training.models.Normalized).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from service.preprocess import prepare

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset directory is malformed; the message names the offending file or folder."""


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from None


def _verify_images(paths: list[Path]) -> None:
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as exc:
            raise DatasetError(f"{p}: not a readable image ({exc})") from None


class ImageFolderDataset(Dataset):
    """Classification: one sub-folder per class. ``classes`` pins the order (e.g. for val)."""

    def __init__(self, root: Path | str, size: tuple[int, int], classes: list[str] | None = None,
                 augment: bool = False, verify: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset directory does not exist")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if classes is None:
            classes = found
        missing = [c for c in classes if c not in found]
        if missing:
            raise DatasetError(f"{self.root}: missing class folder(s) {missing}")
        if len(classes) < 2:
            raise DatasetError(f"{self.root}: need at least two class folders, found {found}")
        self.classes = list(classes)
        self.samples: list[tuple[Path, int]] = []
        for idx, name in enumerate(self.classes):
            files = _image_files(self.root / name)
            if not files:
                raise DatasetError(f"{self.root / name}: class folder holds no images")
            self.samples += [(f, idx) for f in files]
        if verify:
            _verify_images([p for p, _ in self.samples])
        self.size, self.augment = size, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        arr, _ = prepare(_open_rgb(path), self.size[1], self.size[0], "stretch")
        if self.augment and np.random.random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.array(arr)), label


class SegmentationDataset(Dataset):
    """Semantic segmentation: image/mask pairs matched by file stem."""

    def __init__(self, root: Path | str, size: tuple[int, int], augment: bool = False, verify: bool = True) -> None:
        self.root = Path(root)
        for sub in ("images", "masks"):
            if not (self.root / sub).is_dir():
                raise DatasetError(f"{self.root / sub}: folder missing (expected images/ and masks/)")
        classes_file = self.root / "classes.txt"
        if not classes_file.is_file():
            raise DatasetError(f"{classes_file}: missing (one class name a line, background first)")
        self.classes = [ln.strip() for ln in classes_file.read_text().splitlines() if ln.strip()]
        if len(self.classes) < 2:
            raise DatasetError(f"{classes_file}: needs background plus at least one class")
        images = _image_files(self.root / "images")
        if not images:
            raise DatasetError(f"{self.root / 'images'}: no images")
        self.samples: list[tuple[Path, Path]] = []
        for img in images:
            mask = self.root / "masks" / f"{img.stem}.png"
            if not mask.is_file():
                raise DatasetError(f"{mask}: mask missing for {img}")
            self.samples.append((img, mask))
        if verify:
            _verify_images(images)
            for img, mask in self.samples:
                self._load_mask(mask, Image.open(img).size)
        self.size, self.augment = size, augment

    def _load_mask(self, path: Path, image_size: tuple[int, int]) -> Image.Image:
        try:
            m = Image.open(path)
            m.load()
        except Exception as exc:
            raise DatasetError(f"{path}: cannot decode mask ({exc})") from None
        if m.mode not in ("L", "P", "I", "I;16"):
            raise DatasetError(f"{path}: mask must be a single-channel class-index PNG, is mode {m.mode}")
        if m.size != image_size:
            raise DatasetError(f"{path}: mask size {m.size} differs from its image's {image_size}")
        top = int(np.asarray(m).max())
        if top >= len(self.classes):
            raise DatasetError(f"{path}: class id {top} out of range (classes.txt lists {len(self.classes)})")
        return m if m.mode in ("L", "P") else Image.fromarray(np.asarray(m).astype(np.uint8), "L")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, mask_path = self.samples[i]
        img = _open_rgb(img_path)
        mask = self._load_mask(mask_path, img.size)
        h, w = self.size
        arr, _ = prepare(img, w, h, "stretch")
        m = np.asarray(mask.resize((w, h), Image.NEAREST)).astype(np.int64)
        if self.augment and np.random.random() < 0.5:
            arr, m = arr[:, ::-1], m[:, ::-1]
        return torch.from_numpy(np.array(arr)), torch.from_numpy(np.array(m))


class CocoDetectionDataset(Dataset):
    """COCO instances: boxes [x, y, w, h] become xyxy in letterboxed model-input pixels.

    Category ids map to contiguous label indices in ascending id order (``self.classes``).
    Crowd annotations are ignored for training.
    """

    def __init__(self, root: Path | str, size: tuple[int, int], augment: bool = False,
                 annotations: str = "annotations.json", images: str = "images", verify: bool = True) -> None:
        self.root = Path(root)
        ann_path = self.root / annotations
        if not ann_path.is_file():
            raise DatasetError(f"{ann_path}: COCO annotations file missing")
        try:
            doc = json.loads(ann_path.read_text())
        except ValueError as exc:
            raise DatasetError(f"{ann_path}: not valid JSON ({exc})") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc.get(key), list):
                raise DatasetError(f"{ann_path}: missing '{key}' list")
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        if not cats:
            raise DatasetError(f"{ann_path}: no categories")
        self.classes = [c["name"] for c in cats]
        self.cat_to_label = {c["id"]: i for i, c in enumerate(cats)}
        self.image_dir = self.root / images
        self.images: list[dict[str, Any]] = doc["images"]
        by_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in doc["annotations"]:
            if ann.get("image_id") not in by_image:
                raise DatasetError(f"{ann_path}: annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}")
            if ann.get("category_id") not in self.cat_to_label:
                raise DatasetError(f"{ann_path}: annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}")
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and bbox[2] >= 0 and bbox[3] >= 0):
                raise DatasetError(f"{ann_path}: annotation {ann.get('id')} has a malformed bbox {bbox}")
            by_image[ann["image_id"]].append(ann)
        self.annotations = by_image
        paths = [self.image_dir / im["file_name"] for im in self.images]
        for p in paths:
            if not p.is_file():
                raise DatasetError(f"{p}: image listed in {ann_path.name} is missing")
        if verify:
            _verify_images(paths)
        self.size, self.augment = size, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[i]
        img = _open_rgb(self.image_dir / info["file_name"])
        h, w = self.size
        arr, geo = prepare(img, w, h, "letterbox")
        anns = [a for a in self.annotations[info["id"]] if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, [0, 2]] *= geo.scale_x
        boxes[:, [1, 3]] *= geo.scale_y
        labels = np.array([self.cat_to_label[a["category_id"]] for a in anns], np.int64)
        if self.augment and np.random.random() < 0.5:
            arr = arr[:, ::-1]
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        return torch.from_numpy(np.array(arr)), {
            "boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
            "image_id": torch.tensor(info["id"]), "scale": torch.tensor([geo.scale_x, geo.scale_y])}


def detection_collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack images (all the same size) and keep per-image targets as a list."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
