"""Model builders on torchvision architectures, behind one interface: :class:`ConvNet`.

Every model trained here takes uint8 NHWC (RGB, or one greyscale channel), so the
arithmetic preprocessing lives inside the exported ONNX graph and the service feeds raw
pixels. A ConvNet says how it is trained (:meth:`ConvNet.loss`), which module becomes the
graph (:meth:`ConvNet.export_module`) and what that graph outputs (``output_spec``,
``batchable``, ``background_label``): training, validation and export ask the model
instead of testing architecture names.

Random init by default. Transfer learning (:func:`load_weights`): ``weights`` names a local
state-dict file (torchvision's ImageNet weights downloaded elsewhere, or a checkpoint of
ours); the layers sized by the class count are replaced when the data has another count,
anything else that does not fit is an error naming the file and the key. ``freeze
backbone`` then trains the new head only (feature extraction). No hub downloads anywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.contract import OutputSpec
from training import classifiers, segmenters

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8 NHWC -> float NCHW, (x/255 - mean)/std (buffers, not saved in checkpoints).

    A one-channel (greyscale) input broadcasts to the three channels of an ImageNet-style
    network; ``channels=1`` keeps it one channel (for a network whose first layer takes one)."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 channels: int = 3) -> None:
        super().__init__()
        if channels == 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        c = len(mean)
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, c, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, c, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float() * self.scale - self.shift


class ConvNet(nn.Module):
    """The interface every trainable model implements (uint8 [N, H, W, C] in).

    ``output_spec`` names the exported graph's outputs (core.contract.OutputSpec), in the
    order :meth:`export_module` returns them; ``batchable`` is False for graphs that take
    exactly one image; ``background_label`` is True when label 0 of the graph is a
    background class that the dataset does not list. ``last_layers`` are the state-dict
    prefixes (within :meth:`weights_target`) of the layers sized by the class count: what
    transfer learning replaces and what ``freeze_backbone`` leaves trainable.
    """

    output_spec: OutputSpec
    batchable: bool = True
    background_label: bool = False
    last_layers: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()   # optional graph outputs this model can add (OutputSpec fields)

    def loss(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def export_module(self) -> nn.Module:
        """The module that becomes the ONNX graph (uint8 NHWC in, ``output_spec``'s outputs out)."""
        return self

    def weights_target(self) -> nn.Module:
        """The module a weights file describes (the torchvision network where there is one)."""
        return getattr(self, "core", self)

    def with_extras(self, names: list[str] | tuple[str, ...]) -> "ConvNet":
        """Export ``names`` (e.g. embedding, cam) as extra graph outputs; ValueError if unsupported."""
        unknown = [n for n in names if n not in self.extras]
        if unknown:
            raise ValueError(f"this architecture cannot export {unknown}; it can export {list(self.extras) or 'none'}")
        self.output_spec = dataclasses.replace(self.output_spec, **{n: n for n in names})
        return self

    def freeze_backbone(self) -> None:
        """Feature extraction: only the parameters under ``last_layers`` train; every other
        parameter stops taking gradients and every batch norm outside them keeps its running
        statistics (it stays in eval mode, see :meth:`train`)."""
        target = self.weights_target()
        for name, p in target.named_parameters():
            p.requires_grad_(_under(name, self.last_layers))
        self._frozen_norms = [m for name, m in target.named_modules()
                              if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _under(name + ".", self.last_layers)]
        self.train(self.training)

    def train(self, mode: bool = True) -> "ConvNet":
        super().train(mode)
        for m in getattr(self, "_frozen_norms", ()):
            m.eval()
        return self


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name.startswith(p) for p in prefixes)


class Classifier(ConvNet):
    """Normalize, then a classification network split into features and head
    (training.classifiers): [N, C] logits, optionally the embedding and class activation maps."""

    output_spec = OutputSpec(kind="logits", scores="logits")
    extras = ("embedding", "cam")

    def __init__(self, arch: str, core: nn.Module, channels: int = 3) -> None:
        super().__init__()
        self.arch = arch
        self.normalize = Normalize(channels=channels if arch == "lenet5" else 3)
        self.core = core
        family = classifiers.family_of(arch)
        self._family, self.last_layers = family, family.last_layer
        self.head = family.head(core)  # a plain list: these modules are registered once, under core

    def first_conv(self) -> nn.Conv2d:
        """The first convolution (its filters are what training.visualize draws)."""
        return self._family.first_conv(self.core)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the last convolutional feature maps [N, K, h, w]."""
        return self._family.features(self.core, self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _, _ = classifiers.head_outputs(self.head, self.features(x), want_cam=False)
        return logits

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.arch == "googlenet" and self.training:  # main loss + 0.3 x each auxiliary head's
            out = self.core(self.normalize(images))
            return F.cross_entropy(out.logits, targets) + 0.3 * (
                F.cross_entropy(out.aux_logits1, targets) + F.cross_entropy(out.aux_logits2, targets))
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
        self.last_layers = segmenters.LAST_LAYERS[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core(self.normalize(x))
        return out["out"] if isinstance(out, dict) else out

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(images), targets)


def _classifier(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:
    return Classifier(arch, classifiers.build_network(arch, num_classes, width_mult, channels), channels)


def _segmenter(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:
    return Segmenter(arch, segmenters.build_network(arch, num_classes, width_mult))


def _detector(arch: str, num_classes: int, width_mult: float, channels: int) -> ConvNet:
    from training.centernet import CenterNetDetector
    from training.tv_detection import TorchvisionDetector

    if arch.startswith("centernet_"):
        return CenterNetDetector(num_classes, backbone=arch.removeprefix("centernet_"), width_mult=width_mult)
    return TorchvisionDetector(arch, num_classes)


ARCHITECTURES: dict[str, dict[str, Callable[[str, int, float, int], ConvNet]]] = {
    "classification": {a: _classifier for a in classifiers.CLASSIFIERS},
    "segmentation": {a: _segmenter for a in segmenters.SEGMENTERS},
    "detection": {a: _detector for a in ("centernet_mobilenet_v3_small", "centernet_mobilenet_v3_large",
                                         "ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")},
}
DEFAULT_ARCH = {"classification": "mobilenet_v3_small", "segmentation": "fpn_mobilenet_v3_large",
                "detection": "centernet_mobilenet_v3_small"}
# Input side (pixels, square) each architecture was designed for; --size overrides it.
DEFAULT_SIZE = {"lenet5": 32, "ssdlite320_mobilenet_v3_large": 320, "fasterrcnn_mobilenet_v3_large_320_fpn": 320,
                "centernet_mobilenet_v3_small": 256, "centernet_mobilenet_v3_large": 256}


def default_size(arch: str) -> int:
    """The input side ``arch`` is usually trained at: LeNet-5 32, the detectors their own, else 224."""
    return DEFAULT_SIZE.get(arch, 224)


class WeightsError(ValueError):
    """A weights file does not fit the architecture; the message names the file and the key."""


def load_weights(model: ConvNet, path: Path | str) -> list[str]:
    """Initialise ``model`` from the state-dict file at ``path``; returns the keys it replaced.

    The file is a state dict of the network (torchvision's format, e.g. ``resnet18-f37072fd.pth``)
    or a training checkpoint of ours (its ``model`` entry). Tensors under the model's
    ``last_layers`` whose shape differs (another class count) keep their fresh
    initialisation: the head is replaced. Any other missing, unexpected or differently
    shaped tensor is a WeightsError naming the file and the first such key."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable state-dict file ({exc.__class__.__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state:
        state = state["model"]  # a checkpoint of ours: the wrapper's keys
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    target = model.weights_target()
    if target is not model and any(k.startswith("core.") for k in state):
        state = {k.removeprefix("core."): v for k, v in state.items() if k.startswith("core.")}
    own = target.state_dict()
    optional = ("num_batches_tracked",)  # absent from some published files; harmless either way
    head = [k for k in own if _under(k, model.last_layers)]
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
            if key.endswith(optional) or (replace and _under(key, model.last_layers)):
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
                weights: Path | str | None = None, channels: int = 3, freeze: str | None = None) -> ConvNet:
    """Build ``arch`` for ``task`` as a :class:`ConvNet` taking ``channels`` (3 or 1) channels.

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
    model = builder(arch, num_classes, width_mult, channels)
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
