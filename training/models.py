"""Model builders on torchvision architectures, behind one interface: :class:`ConvNet`.

Every model trained here takes uint8 NHWC (RGB, or one greyscale channel), so the
arithmetic preprocessing lives inside the exported ONNX graph and the service feeds raw
pixels. A ConvNet says how it is trained (:meth:`ConvNet.loss`), which module becomes the
graph (:meth:`ConvNet.export_module`) and what that graph outputs (``output_spec``,
``batchable``, ``background_label``): training, validation and export ask the model
instead of testing architecture names. Which architectures exist is one table,
:data:`ARCHITECTURES` (task -> name -> builder); what differs between classifiers is in
their family (training.classifiers), between segmenters in their spec (training.segmenters).

Random init by default. Transfer learning (:func:`load_weights`): ``weights`` names a local
state-dict file (torchvision's ImageNet weights downloaded elsewhere, or a checkpoint of
ours, recognised by training.checkpoints); the layers sized by the class count are replaced
when the data has another count, anything else that does not fit is an error naming the
file and the key. ``freeze backbone`` then trains the new head only (feature extraction).
No hub downloads anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.contract import NEEDS_EMBEDDING, NEEDS_KEYPOINTS, KeypointSpec, OutputSpec
from training import checkpoints, classifiers, segmenters
from training.centernet import CenterNetDetector
from training.convnet import ConvNet, Normalize, under_any
from training.embedding import Embedder
from training.instances import CenterNetInstances
from training.pose import CenterNetPose
from training.tv_detection import TorchvisionDetector, TorchvisionInstanceDetector, TorchvisionKeypointDetector

__all__ = ["ConvNet", "Normalize", "ARCHITECTURES", "build_model", "load_checkpoint", "load_weights"]

class Classifier(ConvNet):
    """Normalize, then a classification network split into features and head
    (training.classifiers, whose family of ``arch`` says how): [N, C] logits, optionally the
    embedding and class activation maps."""

    output_spec = OutputSpec(kind="logits", scores="logits")
    extras = ("embedding", "cam")

    def __init__(self, arch: str, core: nn.Module, channels: int = 3) -> None:
        super().__init__()
        self.arch = arch
        family = classifiers.family_of(arch)
        self.normalize = Normalize(channels=channels if family.input_channels_from_data else 3)
        self.core = core
        self._family, self.last_layers = family, family.last_layer
        self.head = family.head(core)  # a plain list: these modules are registered once, under core

    def first_conv(self) -> nn.Conv2d:
        """The first convolution (its filters are what training.visualize draws)."""
        return self._family.first_conv(self.core)

    def stages(self) -> list[str]:
        """The names (in ``core``) of the features' top-level stages: training.visualize's default layers."""
        return self._family.stages(self.core)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the last convolutional feature maps [N, K, h, w]."""
        return self._family.features(self.core, self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _, _ = classifiers.head_outputs(self.head, self.features(x), want_cam=False)
        return logits

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = self._family.aux_loss_weight
        if weight and self.training:  # the main loss + weight x each auxiliary head's
            logits, *aux = self.core(self.normalize(images))
            return F.cross_entropy(logits, targets) + weight * sum(F.cross_entropy(a, targets) for a in aux)
        return F.cross_entropy(self(images), targets)

    def export_module(self) -> nn.Module:
        return ClassifierGraph(self)


class ClassifierGraph(nn.Module):
    """The exported classifier: logits, then the extras its output spec names (embedding, cam)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier
        spec = classifier.output_spec
        self.embedding, self.cam = spec.embedding is not None, spec.cam is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        c = self.classifier
        logits, embedding, cam = classifiers.head_outputs(c.head, c.features(x), want_cam=self.cam)
        outputs = [logits] + ([embedding] if self.embedding else []) + ([cam] if self.cam else [])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class Segmenter(ConvNet):
    """Normalize, then a segmentation network: [N, C, H, W] mask logits at input resolution;
    label 0 is background."""

    output_spec = OutputSpec(kind="mask_logits", masks="masks")

    def __init__(self, arch: str, core: nn.Module) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.core = core
        self.last_layers = segmenters.spec_of(arch).last_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core(self.normalize(x))
        return out["out"] if isinstance(out, dict) else out

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(images), targets)


def _classifier(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:
    return Classifier(arch, classifiers.build_network(arch, num_classes, width_mult, channels), channels)


def _segmenter(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:
    return Segmenter(arch, segmenters.build_network(arch, num_classes, width_mult))


# The detectors subclass ConvNet in their own modules, so their builders import them when called.

def _centernet(backbone: str) -> Callable[[str, int, float, int], ConvNet]:
    """The builder of CenterNet (training.centernet) on the torchvision network ``backbone``."""
    def build(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:

        return CenterNetDetector(num_classes, backbone=backbone, width_mult=width_mult)
    return build


def _centernet_pose(backbone: str) -> Callable[..., ConvNet]:
    """The builder of CenterNet's pose variant (training.pose) on ``backbone``."""
    def build(arch: str, num_classes: int, width_mult: float, channels: int, keypoints: KeypointSpec) -> ConvNet:
        return CenterNetPose(num_classes, keypoints, backbone=backbone, width_mult=width_mult)
    return build


def _centernet_instances(backbone: str) -> Callable[..., ConvNet]:
    """The builder of CenterNet with YOLACT's masks (training.instances) on ``backbone``."""
    def build(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:
        return CenterNetInstances(num_classes, backbone=backbone, width_mult=width_mult)
    return build


def _embedder(arch: str, num_classes: int, width_mult: float, channels: int, **options: Any) -> ConvNet:
    """An embedding network on classifier ``arch``'s features (training.embedding); ``options``:
    dimension, loss. ``num_classes`` (the training identities) does not shape it."""
    return Embedder(arch, width_mult=width_mult, channels=channels, probe_side=min(default_size(arch), 64), **options)


def _mask_rcnn(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:
    return TorchvisionInstanceDetector(arch, num_classes)


def _keypoint_rcnn(arch: str, num_classes: int, width_mult: float, channels: int, keypoints: KeypointSpec) -> ConvNet:
    return TorchvisionKeypointDetector(arch, num_classes, keypoints)


def _torchvision_detector(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:

    return TorchvisionDetector(arch, num_classes)


# Builders take (arch, classes, width_mult, channels); a keypoint model's also keypoints= (its KeypointSpec),
# an embedding model's its options (dimension=, loss=).
ARCHITECTURES: dict[str, dict[str, Callable[..., ConvNet]]] = {
    "classification": {a: _classifier for a in classifiers.CLASSIFIERS},
    "segmentation": {a: _segmenter for a in segmenters.SEGMENTERS},
    "detection": {"centernet_mobilenet_v3_small": _centernet("mobilenet_v3_small"),
                  "centernet_mobilenet_v3_large": _centernet("mobilenet_v3_large"),
                  "ssdlite320_mobilenet_v3_large": _torchvision_detector,
                  "fasterrcnn_mobilenet_v3_large_320_fpn": _torchvision_detector},
    "instance_segmentation": {"centernet_yolact_mobilenet_v3_small": _centernet_instances("mobilenet_v3_small"),
                              "centernet_yolact_mobilenet_v3_large": _centernet_instances("mobilenet_v3_large"),
                              "maskrcnn_mobilenet_v3_large_320_fpn": _mask_rcnn},
    "keypoints": {"centernet_pose_mobilenet_v3_small": _centernet_pose("mobilenet_v3_small"),
                  "centernet_pose_mobilenet_v3_large": _centernet_pose("mobilenet_v3_large"),
                  "keypointrcnn_mobilenet_v3_large_320_fpn": _keypoint_rcnn},
    "embedding": {a: _embedder for a in classifiers.CLASSIFIERS},  # a classifier's features + projection head
}
DEFAULT_ARCH = {"classification": "mobilenet_v3_small", "segmentation": "fpn_mobilenet_v3_large",
                "detection": "centernet_mobilenet_v3_small", "keypoints": "centernet_pose_mobilenet_v3_small",
                "instance_segmentation": "centernet_yolact_mobilenet_v3_small", "embedding": "mobilenet_v3_small"}
# Input side (pixels, square) each architecture was designed for; --size overrides it.
DEFAULT_SIZE = {"lenet5": 32, "ssdlite320_mobilenet_v3_large": 320, "fasterrcnn_mobilenet_v3_large_320_fpn": 320,
                "keypointrcnn_mobilenet_v3_large_320_fpn": 320, "maskrcnn_mobilenet_v3_large_320_fpn": 320,
                "centernet_yolact_mobilenet_v3_small": 256, "centernet_yolact_mobilenet_v3_large": 256,
                "centernet_mobilenet_v3_small": 256, "centernet_mobilenet_v3_large": 256,
                "centernet_pose_mobilenet_v3_small": 256, "centernet_pose_mobilenet_v3_large": 256}


def default_size(arch: str) -> int:
    """The input side ``arch`` is usually trained at: LeNet-5 32, the detectors their own, else 224."""
    return DEFAULT_SIZE.get(arch, 224)


class WeightsError(ValueError):
    """A weights file does not fit the architecture; the message names the file and the key."""


def load_weights(model: ConvNet, path: Path | str) -> list[str]:
    """Initialise ``model`` from the state-dict file at ``path``; returns the keys it replaced.

    The file is a state dict of the network (torchvision's format, e.g. ``resnet18-f37072fd.pth``)
    or a training checkpoint of ours (its weights: training.checkpoints.model_weights). Tensors under the model's
    ``last_layers`` whose shape differs (another class count) keep their fresh
    initialisation: the head is replaced. Any other missing, unexpected or differently
    shaped tensor is a WeightsError naming the file and the first such key."""
    path = Path(path)
    try:
        content = checkpoints.read(path)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable state-dict file ({exc.__class__.__name__}: {exc})") from None
    state = checkpoints.model_weights(content)  # a checkpoint of ours: the wrapper's keys
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    target = model.weights_target()
    if target is not model and any(k.startswith("core.") for k in state):
        state = {k.removeprefix("core."): v for k, v in state.items() if k.startswith("core.")}
    own = target.state_dict()
    optional = ("num_batches_tracked",)  # absent from some published files; harmless either way
    head = [k for k in own if under_any(k, model.last_layers)]
    replace = any(k not in state or state[k].shape != own[k].shape for k in head)
    position = {k: i for i, k in enumerate(own)}  # the model's own order first, then the file's extras
    for key in sorted(set(own) | set(state), key=lambda k: (position.get(k, len(own)), k)):
        if replace and key in head:
            continue
        if key not in state:
            if key.endswith(optional):
                continue
            raise WeightsError(f"{path}: does not fit this architecture: first mismatching key {key!r} is missing "
                               "from the file")
        if key not in own:
            if key.endswith(optional) or (replace and under_any(key, model.last_layers)):
                continue
            raise WeightsError(f"{path}: does not fit this architecture: first mismatching key {key!r} is not a "
                               "parameter of the model (weights of another architecture?)")
        if state[key].shape != own[key].shape:
            raise WeightsError(f"{path}: does not fit this architecture: first mismatching key {key!r} has shape "
                               f"{list(state[key].shape)} in the file, {list(own[key].shape)} in the model")
    keep = {k: v for k, v in state.items() if k in own and not (replace and k in head)}
    target.load_state_dict(keep, strict=False)
    return head if replace else []


def build_model(task: str, arch: str, num_classes: int, width_mult: float = 1.0,
                weights: Path | str | None = None, channels: int = 3, freeze: str | None = None,
                keypoints: KeypointSpec | None = None, embedding: dict[str, Any] | None = None) -> ConvNet:
    """Build ``arch`` for ``task`` as a :class:`ConvNet` taking ``channels`` (3 or 1) channels;
    a keypoint model needs its ``keypoints`` (names, skeleton, sigmas: from the data), an
    embedding model takes its ``embedding`` options (training.embedding: dimension, loss).

    ``weights``: a local state-dict file to start from (:func:`load_weights`); ``freeze``
    "backbone": train only the layers sized by the class count (feature extraction).
    """
    try:
        builder = ARCHITECTURES[task][arch]
    except KeyError:
        known = {t: sorted(a) for t, a in ARCHITECTURES.items()}
        raise ValueError(f"unknown architecture {arch!r} for {task}; known: {known}") from None
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if (task in NEEDS_KEYPOINTS) != (keypoints is not None):
        raise ValueError(f"a {task} model {'needs' if task in NEEDS_KEYPOINTS else 'takes no'} keypoint names")
    if embedding and task not in NEEDS_EMBEDDING:
        raise ValueError(f"a {task} model takes no embedding options")
    model = builder(arch, num_classes, width_mult, channels, **({"keypoints": keypoints} if keypoints else {}),
                    **(embedding or {}))
    # torchvision's MobileNetV3 sets BatchNorm momentum 0.01, tuned for ImageNet-length runs;
    # on small datasets the running statistics then lag the weights for many epochs and
    # evaluation-mode outputs are garbage. 0.1 (PyTorch's default) tracks them in time.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    if weights:
        replaced = load_weights(model, weights)
        if replaced:
            print(f"{weights}: the class count differs, so the head ({', '.join(replaced)}) starts fresh")
    if freeze == "backbone":
        if not model.last_layers:
            raise ValueError(f"--freeze backbone: {arch} does not say which layers form its head")
        model.freeze_backbone()
    elif freeze:
        raise ValueError(f"freeze must be 'backbone' or empty, got {freeze!r}")
    return model


def load_checkpoint(path: Path, extras: list[str] | tuple[str, ...] = ()
                    ) -> tuple[ConvNet, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, training config, validation metrics) from a checkpoint;
    ``extras``: extra graph outputs to export (ConvNet.with_extras)."""
    ck = checkpoints.read(path)
    cfg = ck["config"]
    spec = KeypointSpec(**cfg["keypoints"]) if cfg.get("keypoints") else None
    model = build_model(cfg["task"], cfg["arch"], len(cfg["classes"]), cfg.get("width_mult", 1.0),
                        channels=cfg.get("channels") or 3, keypoints=spec, embedding=cfg.get("embedding"))
    model.load_state_dict(ck["model"])
    return model.with_extras(extras).eval(), cfg, ck.get("metrics", {})
