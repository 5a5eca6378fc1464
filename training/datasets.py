"""torch Datasets over the on-disk formats that core.datasets reads and validates.

Every item is at the model's input size as uint8 HWC, loaded by core.imaging.load_input:
the decode (EXIF orientation, alpha over white, 16-bit scaling, JPEG draft) and resize the
service applies to requests, so training sees exactly what serving feeds. Normalisation
happens inside the model (training.models.Normalize). Augmentation: horizontal flips.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.contract import COLORS, InputSpec
from core.datasets import CocoDetection, CocoImage, ImageFolder, SegmentationFolder, keypoint_flip
from core.errors import DatasetError, ImageTooLarge, InvalidImage
from core.geometry import Geometry
from core.imaging import load_input
from core.tasks import TASKS

__all__ = ["DatasetError", "ImageFolderDataset", "SegmentationDataset", "CocoDetectionDataset",
           "data_channels", "detection_collate", "input_spec", "seed_worker"]


def input_spec(task: str, height: int, width: int, channels: int = 3) -> InputSpec:
    """The model input a ``task`` model of this size takes (resize policy from core.tasks)."""
    return InputSpec(name="images", height=height, width=width, resize=TASKS[task].default_resize,
                     channels=channels, color=COLORS[channels])


GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def data_channels(task: str, root: Path | str) -> int:
    """1 when every image of the dataset at ``root`` is greyscale (read from the headers), else 3."""
    for sample in TASKS[task].read_dataset(Path(root), verify=False).samples:
        try:
            with Image.open(sample.image) as img:
                if img.mode not in GREY_MODES:
                    return 3
        except OSError:
            continue  # the loaders report unreadable files with their names
    return 1


def _load(path: Path, spec: InputSpec):  # noqa: ANN202 - (decoded, array, geometry)
    try:
        return load_input(path, spec)
    except (InvalidImage, ImageTooLarge) as exc:
        raise DatasetError(f"{path}: {exc}") from None


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy and random from torch's per-worker seed
    (derived from the loader's generator, so reproducible). A module-level function, so it
    also works under the ``spawn`` start method."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ImageFolderDataset(Dataset):
    """Classification: one sub-folder per class. ``classes`` pins the order (e.g. for val)."""

    def __init__(self, root: Path | str, size: tuple[int, int], classes: list[str] | None = None,
                 augment: bool = False, verify: bool = True, channels: int = 3) -> None:
        self.data = ImageFolder(root, classes, verify)
        self.classes, self.samples = self.data.classes, self.data.samples
        self.spec, self.augment = input_spec("classification", *size, channels), augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[i]
        _, arr, _ = _load(sample.image, self.spec)
        if self.augment and np.random.random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.array(arr)), sample.target


class SegmentationDataset(Dataset):
    """Semantic segmentation: image/mask pairs; masks resized (nearest) with their images."""

    def __init__(self, root: Path | str, size: tuple[int, int], augment: bool = False, verify: bool = True,
                 channels: int = 3) -> None:
        self.data = SegmentationFolder(root, verify)
        self.classes, self.samples = self.data.classes, self.data.samples
        self.spec, self.augment = input_spec("segmentation", *size, channels), augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[i]
        decoded, arr, _ = _load(sample.image, self.spec)
        mask = self.data.load_mask(sample.target, (decoded.width, decoded.height))
        m = np.asarray(Image.fromarray(mask, "L").resize((self.spec.width, self.spec.height), Image.NEAREST))
        m = m.astype(np.int64)
        if self.augment and np.random.random() < 0.5:
            arr, m = arr[:, ::-1], m[:, ::-1]
        return torch.from_numpy(np.array(arr)), torch.from_numpy(np.array(m))


class CocoDetectionDataset(Dataset):
    """COCO instances: letterboxed images, boxes xyxy in model-input pixels, label indices; for
    a keypoint data set also ``keypoints`` [K, P, 3] in model-input pixels (flips swap left and
    right); with ``masks``, each object's mask uint8 [K, H, W] letterboxed like its image."""

    def __init__(self, root: Path | str, size: tuple[int, int], augment: bool = False, verify: bool = True,
                 channels: int = 3, masks: bool = False) -> None:
        self.data = CocoDetection(root, verify)
        self.masks = masks
        self.classes, self.samples = self.data.classes, self.data.samples
        self.spec, self.augment = input_spec("detection", *size, channels), augment
        self.flip = keypoint_flip(self.data.keypoint_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample = self.samples[i]
        target: CocoImage = sample.target
        _, arr, geometry = _load(sample.image, self.spec)
        boxes = geometry.boxes_to_input(target.boxes)
        masks = self._masks(target, geometry) if self.masks else None
        keypoints = None
        if target.keypoints is not None:  # a keypoint data set: x, y to input pixels, v as it is
            keypoints = target.keypoints.copy()
            keypoints[..., 0] *= geometry.scale_x
            keypoints[..., 1] *= geometry.scale_y
        if self.augment and np.random.random() < 0.5:
            arr = arr[:, ::-1]
            boxes[:, [0, 2]] = self.spec.width - boxes[:, [2, 0]]
            if masks is not None:
                masks = masks[:, :, ::-1]
            if keypoints is not None:  # mirrored: x flips, left and right trade places
                keypoints = keypoints[:, self.flip]
                keypoints[..., 0] = np.where(keypoints[..., 2] > 0, self.spec.width - keypoints[..., 0], 0.0)
        out = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(target.labels.copy()),
               "image_id": torch.tensor(target.image_id)}
        if keypoints is not None:
            out["keypoints"] = torch.from_numpy(np.ascontiguousarray(keypoints))
        if masks is not None:
            out["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        return torch.from_numpy(np.array(arr)), out

    def _masks(self, target: CocoImage, geometry: Geometry) -> np.ndarray:
        """The objects' masks letterboxed like the image: resized (nearest) to the content, padded with 0."""
        full = self.data.load_masks(target, (geometry.orig_width, geometry.orig_height))
        out = np.zeros((len(full), self.spec.height, self.spec.width), np.uint8)
        for i, m in enumerate(full):
            out[i, :geometry.content_height, :geometry.content_width] = np.asarray(
                Image.fromarray(m).resize((geometry.content_width, geometry.content_height), Image.NEAREST))
        return out


def detection_collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]
                      ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack images (all the same size) and keep per-image targets as a list."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
