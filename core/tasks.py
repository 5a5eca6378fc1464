"""The tasks convserve trains, exports, evaluates and serves, each declared once.

A :class:`Task` names its output layout (core.contract.LAYOUTS: which contract fields name
which tensors, and their rank for one image), how one image's outputs become its result
(plain JSON-ready data: the service, evaluation and the benchmark use the same), the
parameters of that result and their defaults, the metric that ranks checkpoints, how a
dataset of that task is read and how predictions are scored. Everything else looks tasks up
in :data:`TASKS` by name instead of testing names: the HTTP endpoints and their options
(service.endpoints), drawings (service.render), v2 tensors (service.v2) and the training
pieces (training.train) each keep a table keyed by task name.

HTTP-free and plain data: the modules that compute (NumPy, Pillow, pycocotools) are
imported where a method needs them, so reading the table costs no image or array stack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.contract import LAYOUTS, OutputLayout
from core.errors import DatasetError

if TYPE_CHECKING:
    import numpy as np

    from core.contract import ModelContract, OutputSpec
    from core.datasets import CocoDetection, ImageFolder, Sample, SegmentationFolder
    from core.geometry import Geometry

Outputs = dict[str, "np.ndarray"]  # one image's (or one batch's) output tensors by graph output name
MASK_FORMATS = ("rle", "polygon", "png")  # segmentation answers: core.postprocess.segments


class Scorer(Protocol):
    """Accumulates one image's predictions at a time; ``compute`` gives the task's metrics."""

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None: ...

    def compute(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Task(ABC):
    """One task: see the module docstring. Subclasses fill in the fields and three methods."""

    name: str
    layout: OutputLayout      # core.contract.LAYOUTS[name]
    result_key: str           # the key of the per-image result list in the JSON answer
    metric: str               # the validation metric that ranks checkpoints (higher is better)
    default_resize: str       # how export.onnx_export fits images to the input
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the result's parameters and their defaults

    def split(self, outputs: Outputs, count: int, spec: OutputSpec) -> list[Outputs]:
        """A batch's outputs -> one dict per image. An output without a batch axis (a fixed
        batch of 1 may leave it out) belongs to the single image as it is."""
        per_image: list[Outputs] = [{} for _ in range(count)]
        for field_name, tensor in self.layout.named(spec).items():
            value = outputs[tensor]
            rank = self.layout.image_rank(field_name, spec.kind)
            if value.ndim == rank + 1 and value.shape[0] >= count:
                for i in range(count):
                    per_image[i][tensor] = value[i]
            elif value.ndim == rank and count == 1:
                per_image[0][tensor] = value
            else:
                raise ValueError(f"output {tensor!r} has shape {value.shape}; expected rank {rank} per image "
                                 f"plus a batch axis of at least {count}")
        return per_image

    @abstractmethod
    def result(self, outputs: Outputs, geometry: Geometry, contract: ModelContract,
               options: Mapping[str, Any]) -> dict[str, Any]:
        """One image's outputs -> its JSON-ready result (``{result_key: [...]}`` and extras);
        ``options`` holds the parameters of :attr:`defaults`."""

    # --- evaluation -------------------------------------------------------------------

    @abstractmethod
    def read_dataset(self, root: Path, verify: bool = True) -> Any:
        """The core.datasets reader for this task's on-disk format."""

    @abstractmethod
    def scorer(self, contract: ModelContract, dataset: Any) -> Scorer:
        """A Scorer for predictions of a model with ``contract`` on ``dataset``."""


# --- classification ----------------------------------------------------------------------

@dataclass(frozen=True)
class Classification(Task):
    def result(self, outputs: Outputs, geometry: Geometry, contract: ModelContract,
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        o = contract.outputs
        labels = postprocess.top_k(outputs[o.scores], o.kind, contract.labels, options["top_k"])
        if options.get("cam"):
            for label in labels:
                label["heatmap_png"] = postprocess.heatmap_png(outputs[o.cam][label["label_id"]], geometry,
                                                               contract.input)
        return {"labels": labels}

    def read_dataset(self, root: Path, verify: bool = True) -> ImageFolder:
        from core.datasets import ImageFolder

        return ImageFolder(root, verify=verify)

    def scorer(self, contract: ModelContract, dataset: ImageFolder) -> Scorer:
        unknown = [c for c in dataset.classes if c not in contract.labels]
        if unknown:
            raise DatasetError(f"{dataset.root}: class folders {unknown} are not among the model's labels "
                               f"{contract.labels}")
        return _ClassificationScorer(contract, [contract.labels.index(c) for c in dataset.classes])


class _ClassificationScorer:
    def __init__(self, contract: ModelContract, label_of_class: list[int]) -> None:
        from core.metrics import ClassificationMeter

        self.tensor, self.label_of_class = contract.outputs.scores, label_of_class
        self.meter = ClassificationMeter(len(contract.labels))

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None:
        import numpy as np

        self.meter.update(outputs[self.tensor][None], np.array([self.label_of_class[sample.target]]))

    def compute(self) -> dict[str, Any]:
        return self.meter.compute()


# --- detection ---------------------------------------------------------------------------

# COCO's protocol: up to 100 detections per image; a low floor keeps the precision-recall
# curve complete. Used by training-time validation and export.evaluate alike.
EVAL_SCORE_THRESHOLD = 0.001
EVAL_MAX_DETECTIONS = 100
EVAL_MAX_POSES = 20  # COCOeval's keypoint protocol: maxDets 20


@dataclass(frozen=True)
class Detection(Task):
    def result(self, outputs: Outputs, geometry: Geometry, contract: ModelContract,
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        o = contract.outputs
        return {"detections": postprocess.detections(outputs[o.boxes], outputs[o.scores], outputs[o.labels], geometry,
                                                     contract.labels, options["score_threshold"],
                                                     options["max_detections"])}

    def read_dataset(self, root: Path, verify: bool = True) -> CocoDetection:
        from core.datasets import CocoDetection

        return CocoDetection(root, verify=verify)

    def scorer(self, contract: ModelContract, dataset: CocoDetection) -> Scorer:
        """COCO box mAP of the detections the service would return (score >= 0.001, top 100)."""
        from core.metrics import coco_detection_metrics

        options = {"score_threshold": EVAL_SCORE_THRESHOLD, "max_detections": EVAL_MAX_DETECTIONS}
        return _CocoScorer(self, contract, dataset, options, coco_box_results, coco_detection_metrics)


def coco_box_results(image_id: int, category_id: int, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A detection answer's objects as COCO box results: bbox [x, y, w, h] in original pixels."""
    return [{"image_id": image_id, "category_id": category_id, "score": d["score"],
             "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
            for d in found]


class _CocoScorer:
    """pycocotools' metrics of the objects the service would return for each image (its answer
    with ``options``: COCO's low score floor and per-image cap), converted to COCO results by
    ``convert`` (image id, category id, the answer's objects) and scored by ``metrics``
    (ground truth, results, image ids). Objects of a label the data set does not list (a
    background class) are left out."""

    def __init__(self, task: Task, contract: ModelContract, dataset: CocoDetection, options: Mapping[str, Any],
                 convert: Callable[[int, int, list[dict[str, Any]]], list[dict[str, Any]]],
                 metrics: Callable[[Any, list[dict[str, Any]], list[int]], dict[str, Any]]) -> None:
        self.task, self.contract, self.dataset, self.options = task, contract, dataset, options
        self.convert, self.metrics = convert, metrics
        self.category_of = dict(zip(dataset.classes, dataset.category_ids))
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None:
        image_id = sample.target.image_id  # a core.datasets.CocoImage
        self.image_ids.append(image_id)
        for d in self.task.result(outputs, geometry, self.contract, self.options)[self.task.result_key]:
            category = self.category_of.get(d["label"])
            if category is not None:
                self.results += self.convert(image_id, category, [d])

    def compute(self) -> dict[str, Any]:
        return self.metrics(self.dataset.coco, self.results, self.image_ids)


# --- instance segmentation -------------------------------------------------------------

@dataclass(frozen=True)
class InstanceSegmentation(Task):
    """Detection with a mask per object (COCO RLE at the image size by default); scored by
    COCO's mask AP (pycocotools' ``segm``)."""

    def result(self, outputs: Outputs, geometry: Geometry, contract: ModelContract,
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        o = contract.outputs
        return {"detections": postprocess.instance_detections(
            outputs[o.boxes], outputs[o.scores], outputs[o.labels], outputs[o.masks], geometry, contract.input,
            contract.labels, options["score_threshold"], options["max_detections"], options["mask_format"])}

    def read_dataset(self, root: Path, verify: bool = True) -> CocoDetection:
        from core.datasets import CocoDetection

        return CocoDetection(root, verify=verify)

    def scorer(self, contract: ModelContract, dataset: CocoDetection) -> Scorer:
        """COCO mask AP of the instances the service would return (score >= 0.001, top 100)."""
        from core.metrics import coco_mask_metrics

        options = {"score_threshold": EVAL_SCORE_THRESHOLD, "max_detections": EVAL_MAX_DETECTIONS,
                   "mask_format": "rle"}
        return _CocoScorer(self, contract, dataset, options, coco_mask_results, coco_mask_metrics)


def coco_mask_results(image_id: int, category_id: int, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An instances answer's detections (``mask_format=rle``) as COCO results for pycocotools."""
    return [{**box, "segmentation": d["rle"]} for box, d in zip(coco_box_results(image_id, category_id, found), found)]


# --- keypoints ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Keypoints(Task):
    """Detection with named keypoints per object (the contract's ``keypoints``: names,
    skeleton, OKS sigmas); scored by COCO's keypoint AP (object keypoint similarity)."""

    def result(self, outputs: Outputs, geometry: Geometry, contract: ModelContract,
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        o, names = contract.outputs, contract.keypoints.names  # type: ignore[union-attr]
        return {"detections": postprocess.pose_detections(outputs[o.boxes], outputs[o.scores], outputs[o.labels],
                                                          outputs[o.keypoints], geometry, contract.labels, names,
                                                          options["score_threshold"], options["max_detections"])}

    def read_dataset(self, root: Path, verify: bool = True) -> CocoDetection:
        from core.datasets import CocoDetection

        data = CocoDetection(root, verify=verify)
        if not data.keypoint_names:
            raise DatasetError(f"{data.annotations_file}: no category lists 'keypoints': not a keypoint data set")
        return data

    def scorer(self, contract: ModelContract, dataset: CocoDetection) -> Scorer:
        """COCO keypoint AP (OKS with the contract's sigmas) of what /keypoints would answer
        (score >= 0.001, top 20: COCOeval's keypoint protocol keeps 20 objects an image)."""
        if contract.keypoints is None or dataset.keypoint_names != contract.keypoints.names:
            raise DatasetError(f"{dataset.annotations_file}: keypoints {dataset.keypoint_names} differ from the "
                               f"model's {contract.keypoints.names if contract.keypoints else None}")
        from core.metrics import coco_keypoint_metrics

        options = {"score_threshold": EVAL_SCORE_THRESHOLD, "max_detections": EVAL_MAX_POSES}
        sigmas = contract.keypoints.sigmas
        return _CocoScorer(self, contract, dataset, options, coco_keypoint_results,
                           lambda coco, results, ids: coco_keypoint_metrics(coco, results, ids, sigmas))


def coco_keypoint_results(image_id: int, category_id: int, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A keypoints answer's detections as COCO results (pycocotools' loadRes): keypoints
    [x, y, v] per keypoint in original pixels, v the keypoint's score (COCOeval ignores it)."""
    return [{"image_id": image_id, "category_id": category_id, "score": d["score"],
             "keypoints": [v for k in d["keypoints"] for v in (k["x"], k["y"], k["score"])]} for d in found]


# --- segmentation ------------------------------------------------------------------------

@dataclass(frozen=True)
class Segmentation(Task):
    def result(self, outputs: Outputs, geometry: Geometry, contract: ModelContract,
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        o = contract.outputs
        return postprocess.segments(postprocess.class_map(outputs[o.masks], o.kind, geometry), contract.labels,
                                    options["mask_format"])

    def read_dataset(self, root: Path, verify: bool = True) -> SegmentationFolder:
        from core.datasets import SegmentationFolder

        return SegmentationFolder(root, verify=verify)

    def scorer(self, contract: ModelContract, dataset: SegmentationFolder) -> Scorer:
        if dataset.classes != contract.labels:
            raise DatasetError(f"{dataset.root}/classes.txt lists {dataset.classes}; "
                               f"the model's labels are {contract.labels}")
        return _SegmentationScorer(contract, dataset)


class _SegmentationScorer:
    """Confusion-matrix IoU of class maps at the original image size."""

    def __init__(self, contract: ModelContract, dataset: SegmentationFolder) -> None:
        from core.metrics import ConfusionMatrix

        self.contract, self.dataset = contract, dataset
        self.matrix = ConfusionMatrix(len(contract.labels))

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None:
        from core import postprocess

        o = self.contract.outputs
        cmap = postprocess.class_map(outputs[o.masks], o.kind, geometry)
        truth = self.dataset.load_mask(sample.target, (geometry.orig_width, geometry.orig_height))
        self.matrix.update(cmap, truth)

    def compute(self) -> dict[str, Any]:
        return self.matrix.compute(self.contract.labels)


# --- embedding ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Embedding(Task):
    """Similarity learning: one unit-length vector per image (the contract's ``embedding``:
    dimension, metric), trained so that views of one identity lie close. A data set is an
    ImageFolder with one folder per identity; it is scored by leave-one-out retrieval
    (core.metrics.retrieval_metrics: recall@1, recall@5, mAP@R)."""

    def result(self, outputs: Outputs, geometry: Geometry, contract: ModelContract,
               options: Mapping[str, Any]) -> dict[str, Any]:
        from core import postprocess

        vector = postprocess.l2_normalize(outputs[contract.outputs.embedding])
        return {"embedding": [round(float(v), 7) + 0.0 for v in vector], "dimensions": int(vector.shape[0])}

    def read_dataset(self, root: Path, verify: bool = True) -> ImageFolder:
        from core.datasets import ImageFolder

        return ImageFolder(root, verify=verify)

    def scorer(self, contract: ModelContract, dataset: ImageFolder) -> Scorer:
        return _RetrievalScorer(contract.outputs.embedding or "")


class _RetrievalScorer:
    """Keeps every image's embedding and identity (its folder); retrieval metrics at the end."""

    def __init__(self, tensor: str) -> None:
        self.tensor = tensor
        self.vectors: list[np.ndarray] = []
        self.identities: list[int] = []

    def add(self, sample: Sample, outputs: Outputs, geometry: Geometry) -> None:
        self.vectors.append(outputs[self.tensor].reshape(-1))
        self.identities.append(sample.target)

    def compute(self) -> dict[str, Any]:
        import numpy as np

        from core.metrics import retrieval_metrics

        if not self.vectors:
            return retrieval_metrics(np.zeros((0, 1)), np.zeros(0, int))
        return retrieval_metrics(np.stack(self.vectors), np.array(self.identities))


# --- the table ---------------------------------------------------------------------------

TASKS: dict[str, Task] = {t.name: t for t in (
    Classification(name="classification", layout=LAYOUTS["classification"], result_key="labels", metric="top1",
                   default_resize="stretch", defaults={"top_k": 5, "cam": False}),
    Detection(name="detection", layout=LAYOUTS["detection"], result_key="detections", metric="map_50",
              default_resize="letterbox", defaults={"score_threshold": 0.3, "max_detections": 100}),
    Segmentation(name="segmentation", layout=LAYOUTS["segmentation"], result_key="classes", metric="miou",
                 default_resize="stretch", defaults={"mask_format": "rle"}),
    InstanceSegmentation(name="instance_segmentation", layout=LAYOUTS["instance_segmentation"],
                         result_key="detections", metric="mask_ap_50", default_resize="letterbox",
                         defaults={"score_threshold": 0.3, "max_detections": 100, "mask_format": "rle"}),
    Keypoints(name="keypoints", layout=LAYOUTS["keypoints"], result_key="detections", metric="oks_ap_50",
              default_resize="letterbox", defaults={"score_threshold": 0.3, "max_detections": 100}),
    Embedding(name="embedding", layout=LAYOUTS["embedding"], result_key="embedding", metric="map_at_r",
              default_resize="stretch"),
)}
