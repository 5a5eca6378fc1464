"""The three on-disk dataset formats, read and validated up front, without torch.

- :class:`ImageFolder`: ``<root>/<class>/<image>`` (torchvision's ImageFolder layout).
- :class:`CocoDetection`: ``<root>/annotations.json`` (COCO instances) + ``<root>/images/``.
- :class:`SegmentationFolder`: ``<root>/images/<stem>.*`` + ``<root>/masks/<stem>.png``
  (class index per pixel, in the image's upright orientation) + ``<root>/classes.txt``
  (one name a line, background first).

Each lists :class:`Sample` items (an image path and its target). With ``verify=True``
(training) every image is opened and checked and any problem is a DatasetError naming the
file; with ``verify=False`` (evaluation) files that are not images are skipped with a
warning. training/datasets.py wraps these readers in torch Datasets; core.evaluation scores
models on them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import DatasetError
from core.imaging import IMAGE_SUFFIXES

log = logging.getLogger("convserve.datasets")


@dataclass(frozen=True)
class Sample:
    """One image and its target: a class index, a mask path, or a COCO image's annotations."""

    image: Path
    target: Any


def image_files(folder: Path) -> list[Path]:
    """Image files in ``folder``, sorted; other files are skipped with a warning (hidden files silently)."""
    images, skipped = [], []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        (images if p.suffix.lower() in IMAGE_SUFFIXES else skipped).append(p)
    if skipped:
        log.warning("skipping %d file(s) that are not images in %s: %s", len(skipped), folder,
                    ", ".join(p.name for p in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return images


def verify_images(paths: list[Path]) -> None:
    """Open and verify every image; DatasetError naming the first one that is unreadable."""
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as exc:
            raise DatasetError(f"{p}: not a readable image ({exc})") from None


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image after EXIF orientation, from its header."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class ImageFolder:
    """Classification: one sub-folder per class. ``classes`` pins the order (e.g. for val)."""

    def __init__(self, root: Path | str, classes: list[str] | None = None, verify: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset directory does not exist")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            classes = found
        missing = [c for c in classes if c not in found]
        if missing:
            raise DatasetError(f"{self.root}: missing class folder(s) {missing}")
        if len(classes) < 2:
            raise DatasetError(f"{self.root}: need at least two class folders, found {found}")
        self.classes = list(classes)
        self.samples: list[Sample] = []
        for idx, name in enumerate(self.classes):
            files = image_files(self.root / name)
            if not files:
                raise DatasetError(f"{self.root / name}: class folder holds no images")
            self.samples += [Sample(f, idx) for f in files]
        if verify:
            verify_images([s.image for s in self.samples])


class SegmentationFolder:
    """Semantic segmentation: image/mask pairs matched by file stem."""

    def __init__(self, root: Path | str, verify: bool = True) -> None:
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
        images = image_files(self.root / "images")
        if not images:
            raise DatasetError(f"{self.root / 'images'}: no images")
        self.samples: list[Sample] = []
        for img in images:
            mask = self.root / "masks" / f"{img.stem}.png"
            if not mask.is_file():
                raise DatasetError(f"{mask}: mask missing for {img}")
            self.samples.append(Sample(img, mask))
        if verify:
            verify_images(images)
            for s in self.samples:
                self.load_mask(s.target, upright_size(s.image))

    def load_mask(self, path: Path, image_size: tuple[int, int]) -> np.ndarray:
        """The class-index mask as uint8 [H, W], checked against the image's upright size."""
        try:
            with Image.open(path) as m:
                m.load()
                mode, size, arr = m.mode, m.size, np.asarray(m)
        except Exception as exc:
            raise DatasetError(f"{path}: cannot decode mask ({exc})") from None
        if mode not in ("L", "P", "I", "I;16"):
            raise DatasetError(f"{path}: mask must be a single-channel class-index PNG, is mode {mode}")
        if size != image_size:
            raise DatasetError(f"{path}: mask size {size} differs from its image's {image_size}")
        top = int(arr.max())
        if top >= len(self.classes):
            raise DatasetError(f"{path}: class id {top} out of range (classes.txt lists {len(self.classes)})")
        return arr.astype(np.uint8)


@dataclass(frozen=True)
class CocoImage:
    """One COCO image's annotations: boxes xyxy in original pixels and label indices; for a
    keypoint data set, each object's keypoints too."""

    image_id: int
    boxes: np.ndarray   # float32 [K, 4]
    labels: np.ndarray  # int64 [K], indices into CocoDetection.classes
    keypoints: np.ndarray | None = None  # float32 [K, P, 3]: x, y in original pixels, v (0 unlabelled, 1, 2)
    segmentations: tuple[Any, ...] | None = None  # each object's COCO segmentation (RLE or polygons), if all have one


# COCO's person keypoints and their OKS sigmas (pycocotools' defaults, cocoeval.py): a data set
# whose category lists these names needs no "sigmas" of its own.
COCO_KEYPOINT_SIGMAS = {
    "nose": 0.026, "left_eye": 0.025, "right_eye": 0.025, "left_ear": 0.035, "right_ear": 0.035,
    "left_shoulder": 0.079, "right_shoulder": 0.079, "left_elbow": 0.072, "right_elbow": 0.072,
    "left_wrist": 0.062, "right_wrist": 0.062, "left_hip": 0.107, "right_hip": 0.107, "left_knee": 0.087,
    "right_knee": 0.087, "left_ankle": 0.089, "right_ankle": 0.089,
}


def keypoint_flip(names: list[str] | tuple[str, ...]) -> list[int]:
    """For a mirrored image: the keypoint each slot holds afterwards (``left_*`` and ``right_*``
    trade places, the rest stay). KeyError-free: a name without its pair stays where it is."""
    index = {n: i for i, n in enumerate(names)}

    def mirror(name: str) -> str:
        return name.replace("left", "\0").replace("right", "left").replace("\0", "right")

    return [index.get(mirror(n), i) for i, n in enumerate(names)]


def _keypoint_schema(cats: list[dict[str, Any]], where: Path) -> tuple[list[str], list[tuple[int, int]], list[float]]:
    """Keypoint names, skeleton (0-based pairs) and OKS sigmas of a person_keypoints-style file
    (every category lists the same ``keypoints``); empty lists for a plain instances file."""
    named = [c for c in cats if c.get("keypoints")]
    if not named:
        return [], [], []
    names = list(named[0]["keypoints"])
    if any(list(c.get("keypoints") or []) != names for c in cats):
        raise DatasetError(f"{where}: every category must list the same keypoints")
    skeleton = []
    for edge in named[0].get("skeleton") or []:
        if not (isinstance(edge, list) and len(edge) == 2 and all(isinstance(i, int) and 1 <= i <= len(names)
                                                                 for i in edge)):
            raise DatasetError(f"{where}: skeleton edge {edge} is not a pair of 1-based keypoint indices")
        skeleton.append((edge[0] - 1, edge[1] - 1))
    sigmas = named[0].get("sigmas")
    if sigmas is None:
        unknown = [n for n in names if n not in COCO_KEYPOINT_SIGMAS]
        if unknown:
            raise DatasetError(f"{where}: keypoints {unknown} have no OKS sigma: add a 'sigmas' list (one per "
                               "keypoint) to the category")
        sigmas = [COCO_KEYPOINT_SIGMAS[n] for n in names]
    if len(sigmas) != len(names) or not all(isinstance(v, (int, float)) and v > 0 for v in sigmas):
        raise DatasetError(f"{where}: 'sigmas' must hold one positive number per keypoint ({len(names)})")
    return names, skeleton, [float(v) for v in sigmas]


class CocoDetection:
    """COCO instances. Category ids map to contiguous label indices in ascending id order
    (``classes``); crowd annotations are left out of the targets (COCOeval ignores them)."""

    def __init__(self, root: Path | str, verify: bool = True, annotations: str = "annotations.json",
                 images: str = "images") -> None:
        self.root = Path(root)
        self.annotations_file = self.root / annotations
        if not self.annotations_file.is_file():
            raise DatasetError(f"{self.annotations_file}: COCO annotations file missing")
        try:
            doc = json.loads(self.annotations_file.read_text())
        except ValueError as exc:
            raise DatasetError(f"{self.annotations_file}: not valid JSON ({exc})") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc.get(key), list):
                raise DatasetError(f"{self.annotations_file}: missing '{key}' list")
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        if not cats:
            raise DatasetError(f"{self.annotations_file}: no categories")
        self.classes: list[str] = [c["name"] for c in cats]
        self.category_ids: list[int] = [c["id"] for c in cats]
        # Keypoint data sets (person_keypoints): names, 0-based skeleton edges, OKS sigmas.
        self.keypoint_names, self.skeleton, self.sigmas = _keypoint_schema(cats, self.annotations_file)
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        by_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in doc["images"]}
        for ann in doc["annotations"]:
            where = f"{self.annotations_file}: annotation {ann.get('id')}"
            if ann.get("image_id") not in by_image:
                raise DatasetError(f"{where} refers to unknown image_id {ann.get('image_id')}")
            if ann.get("category_id") not in label_of:
                raise DatasetError(f"{where} has unknown category_id {ann.get('category_id')}")
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and bbox[2] >= 0 and bbox[3] >= 0):
                raise DatasetError(f"{where} has a malformed bbox {bbox}")
            by_image[ann["image_id"]].append(ann)
        self.samples: list[Sample] = []
        for im in doc["images"]:
            path = self.root / images / im["file_name"]
            if not path.is_file():
                raise DatasetError(f"{path}: image listed in {self.annotations_file.name} is missing")
            anns = [a for a in by_image[im["id"]] if not a.get("iscrowd", 0)]
            boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            labels = np.array([label_of[a["category_id"]] for a in anns], np.int64)
            segmentations = tuple(a["segmentation"] for a in anns) if all(a.get("segmentation") for a in anns) \
                else None
            self.samples.append(Sample(path, CocoImage(int(im["id"]), boxes, labels, self._keypoints(anns),
                                                       segmentations)))
        if verify:
            verify_images([s.image for s in self.samples])
            for s, im in zip(self.samples, doc["images"]):
                if "width" in im and "height" in im and upright_size(s.image) != (im["width"], im["height"]):
                    raise DatasetError(f"{s.image}: {self.annotations_file.name} says {im['width']}x{im['height']}, "
                                       f"the image is {'x'.join(map(str, upright_size(s.image)))} "
                                       "after EXIF orientation")
        self._coco: Any = None

    def _keypoints(self, anns: list[dict[str, Any]]) -> np.ndarray | None:
        if not self.keypoint_names:
            return None
        want = 3 * len(self.keypoint_names)
        for a in anns:
            kp = a.get("keypoints")
            if not (isinstance(kp, list) and len(kp) == want):
                raise DatasetError(f"{self.annotations_file}: annotation {a.get('id')} needs 'keypoints' of {want} "
                                   f"numbers (x, y, v for each of {len(self.keypoint_names)}), has "
                                   f"{len(kp) if isinstance(kp, list) else kp!r}")
        return np.array([a["keypoints"] for a in anns], np.float32).reshape(len(anns), len(self.keypoint_names), 3)

    def load_masks(self, target: CocoImage, image_size: tuple[int, int]) -> np.ndarray:
        """Each object's mask, uint8 [K, H, W] at ``image_size`` (width, height), decoded from its
        COCO segmentation (compressed or uncompressed RLE, or polygons) by pycocotools."""
        from pycocotools import mask as mask_utils

        width, height = image_size
        if target.segmentations is None:
            raise DatasetError(f"{self.annotations_file}: image {target.image_id} has objects without a "
                               "'segmentation': not an instance segmentation data set")
        masks = np.zeros((len(target.segmentations), height, width), np.uint8)
        for i, segm in enumerate(target.segmentations):
            if isinstance(segm, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
            elif isinstance(segm.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segm, height, width)
            else:
                rle = {"size": segm["size"], "counts": segm["counts"].encode() if isinstance(segm["counts"], str)
                       else segm["counts"]}
            if list(rle["size"]) != [height, width]:
                raise DatasetError(f"{self.annotations_file}: image {target.image_id}: a mask of size "
                                   f"{list(rle['size'])}, the image is {[height, width]} (height, width)")
            masks[i] = mask_utils.decode(rle)
        return masks

    @property
    def coco(self) -> Any:
        """The pycocotools COCO object of the annotations file (for COCOeval)."""
        if self._coco is None:
            from core.metrics import load_coco

            self._coco = load_coco(str(self.annotations_file))
        return self._coco


__all__ = ["Sample", "ImageFolder", "SegmentationFolder", "CocoDetection", "CocoImage", "COCO_KEYPOINT_SIGMAS",
           "keypoint_flip", "image_files",
           "verify_images", "upright_size"]
