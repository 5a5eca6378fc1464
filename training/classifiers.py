"""The classification architectures, each split into convolutional features and a head.

Every classifier here is a torchvision network (or, for LeNet-5, a module laid out the same
way) seen as ``features(x) -> [N, K, h, w]`` followed by a head: a plain sequence of
pooling, flatten, linear, activation and dropout layers. That split is what makes the
optional graph outputs computable without gradients:

- the **embedding** is the head's input to its last linear layer (the penultimate
  features, e.g. ResNet's 512 pooled features, VGG's second 4096-wide layer);
- the **class activation map** of class c is Grad-CAM (Selvaraju et al. 2017): the ReLU of
  the feature maps weighted by the mean gradient of logit c over each map. The head is
  piecewise linear or smooth, so that gradient is a product of its weight matrices and its
  activation derivatives, written out in :func:`head_outputs` and exported as ordinary ONNX
  operations. For a global-average-pool + linear head (ResNet, GoogLeNet) it is exactly
  CAM (Zhou et al. 2016) scaled by 1/(h*w).

The networks keep torchvision's module names, so torchvision state dicts (ImageNet weights
downloaded elsewhere) load into them unchanged; ``width_mult`` < 1 narrows the classic
networks (AlexNet, VGG) for tests and small data, at the cost of that compatibility.

:data:`CLASSIFIERS` is the architecture table: each name maps to its :class:`Family`, which
says everything the rest of training needs to know about it (how to build it, how it
splits, which layers a new class count replaces, whether it takes its input channels from
the data, whether it trains auxiliary heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) as courses teach it today: two 5x5 convolutions with
    2x2 max pooling, then 120, 84 and ``num_classes`` fully connected units, ReLU throughout.
    Made for 32x32 inputs; other sizes are pooled to the 5x5 grid the first linear layer expects."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((5, 5))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _scaled(c: int, w: float, minimum: int = 8) -> int:
    return max(minimum, int(round(c * w)))


def _init_linear(layers: nn.Sequential) -> nn.Sequential:
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return layers


def _mlp(cin: int, hidden: int, num_classes: int, dropout_first: bool) -> nn.Sequential:
    """torchvision's AlexNet/VGG classifier layout with ``hidden`` units (4096 there)."""
    if dropout_first:  # AlexNet
        return _init_linear(nn.Sequential(nn.Dropout(0.5), nn.Linear(cin, hidden), nn.ReLU(True), nn.Dropout(0.5),
                                          nn.Linear(hidden, hidden), nn.ReLU(True), nn.Linear(hidden, num_classes)))
    return _init_linear(nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(True), nn.Dropout(0.5),
                                      nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
                                      nn.Linear(hidden, num_classes)))


def alexnet(num_classes: int, width_mult: float = 1.0) -> nn.Module:
    """torchvision's AlexNet; ``width_mult`` scales every layer's channels and units."""
    net = tvm.alexnet(weights=None, num_classes=num_classes)
    if width_mult != 1.0:
        c = [_scaled(v, width_mult) for v in (64, 192, 384, 256, 256)]
        net.features = nn.Sequential(
            nn.Conv2d(3, c[0], 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(True),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(True),
            nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
        net.classifier = _mlp(c[4] * 36, _scaled(4096, width_mult, 16), num_classes, dropout_first=True)
    return net


# torchvision's layer configuration of each VGG, and whether it has batch norm.
_VGG_CFG = {"vgg11": ("A", False), "vgg11_bn": ("A", True), "vgg13": ("B", False), "vgg13_bn": ("B", True),
            "vgg16": ("D", False), "vgg16_bn": ("D", True), "vgg19": ("E", False), "vgg19_bn": ("E", True)}


def vgg(arch: str, num_classes: int, width_mult: float = 1.0) -> nn.Module:
    """torchvision's VGG (``vgg16_bn``: with batch norm); ``width_mult`` scales channels and units."""
    if width_mult == 1.0:
        return getattr(tvm, arch)(weights=None, num_classes=num_classes)
    layers, batch_norm = _VGG_CFG[arch]
    cfg = [v if v == "M" else _scaled(v, width_mult) for v in tvm.vgg.cfgs[layers]]
    net = tvm.vgg.VGG(tvm.vgg.make_layers(cfg, batch_norm=batch_norm), num_classes=num_classes)
    net.classifier = _mlp(int(cfg[-2]) * 49, _scaled(4096, width_mult, 16), num_classes, dropout_first=False)
    return net


Builder = Callable[[str, int, float, int], nn.Module]  # (arch, num_classes, width_mult, channels) -> network


@dataclass(frozen=True)
class Family:
    """One kind of network: how to build it, how it splits into conv features and head,
    and what training must know about it.

    ``last_layer``: state-dict prefixes of the class-count-sized layers (replaced on
    transfer); ``stages``: the names of its features' top-level stages (what
    training.visualize shows by default); ``input_channels_from_data``: the first layer
    takes the data's channels (1 for greyscale) instead of RGB; ``aux_loss_weight``: in
    training mode the network returns ``(logits, *auxiliary logits)`` and each auxiliary
    head's cross-entropy is added with this weight (0: no auxiliary heads)."""

    build: Builder
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module], list[nn.Module]]
    last_layer: tuple[str, ...]
    first_conv: Callable[[nn.Module], nn.Conv2d]
    stages: Callable[[nn.Module], list[str]]
    input_channels_from_data: bool = False
    aux_loss_weight: float = 0.0


def _resnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


_GOOGLENET_BLOCKS = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                     "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                     "inception5a", "inception5b")


def _googlenet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for name in _GOOGLENET_BLOCKS:  # GoogLeNet._forward in eval mode, without the auxiliary heads
        x = getattr(net, name)(x)
    return x


def _sequential_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.features(x)


def _sequential_stages(net: nn.Module) -> list[str]:
    """Four blocks spread over ``net.features``: the first, a third and two thirds in, the last."""
    n = len(net.features)
    return [f"features.{i}" for i in sorted({0, n // 3, (2 * n) // 3, n - 1})]


def _pooled_head(net: nn.Module) -> list[nn.Module]:
    return [net.avgpool, nn.Flatten(1), *net.classifier]


def _torchvision_network(arch: str, num_classes: int, width_mult: float, channels: int) -> nn.Module:
    return getattr(tvm, arch)(weights=None, num_classes=num_classes)


def _googlenet(arch: str, num_classes: int, width_mult: float, channels: int) -> nn.Module:
    # Auxiliary heads train (their loss is added: GOOGLENET.aux_loss_weight) and are left out of
    # the exported graph; transform_input stays off: normalisation is ours (training.models.Normalize).
    return tvm.googlenet(weights=None, num_classes=num_classes, aux_logits=True, init_weights=True,
                         transform_input=False)


RESNET = Family(build=_torchvision_network, features=_resnet_features,
                head=lambda n: [n.avgpool, nn.Flatten(1), n.fc], last_layer=("fc.",),
                first_conv=lambda n: n.conv1, stages=lambda n: ["layer1", "layer2", "layer3", "layer4"])
GOOGLENET = Family(build=_googlenet, features=_googlenet_features,
                   head=lambda n: [n.avgpool, nn.Flatten(1), n.dropout, n.fc],
                   last_layer=("fc.", "aux1.fc2.", "aux2.fc2."), first_conv=lambda n: n.conv1.conv,
                   stages=lambda n: ["conv1", "inception3b", "inception4e", "inception5b"], aux_loss_weight=0.3)
MOBILENET_V3 = Family(build=lambda arch, n, w, c: getattr(tvm, arch)(weights=None, num_classes=n, width_mult=w),
                      features=_sequential_features, head=_pooled_head, last_layer=("classifier.3.",),
                      first_conv=lambda n: n.features[0][0], stages=_sequential_stages)
VGG = Family(build=lambda arch, n, w, c: vgg(arch, n, w), features=_sequential_features, head=_pooled_head,
             last_layer=("classifier.6.",), first_conv=lambda n: n.features[0], stages=_sequential_stages)
ALEXNET = Family(build=lambda arch, n, w, c: alexnet(n, w), features=_sequential_features, head=_pooled_head,
                 last_layer=("classifier.6.",), first_conv=lambda n: n.features[0], stages=_sequential_stages)
LENET5 = Family(build=lambda arch, n, w, c: LeNet5(n, in_channels=c), features=_sequential_features,
                head=_pooled_head, last_layer=("classifier.4.",), first_conv=lambda n: n.features[0],
                stages=_sequential_stages, input_channels_from_data=True)

# The classification architectures: name -> family.
CLASSIFIERS: dict[str, Family] = {
    "lenet5": LENET5, "alexnet": ALEXNET, "vgg11": VGG, "vgg11_bn": VGG, "vgg16": VGG, "vgg16_bn": VGG,
    "googlenet": GOOGLENET, "resnet18": RESNET, "resnet34": RESNET, "resnet50": RESNET,
    "mobilenet_v3_small": MOBILENET_V3, "mobilenet_v3_large": MOBILENET_V3,
}


def family_of(arch: str) -> Family:
    """The family of classification architecture ``arch``; ValueError if there is none."""
    try:
        return CLASSIFIERS[arch]
    except KeyError:
        raise ValueError(f"no classifier family for {arch!r}") from None


def build_network(arch: str, num_classes: int, width_mult: float, channels: int) -> nn.Module:
    """The torchvision-style network for ``arch`` (random init)."""
    return family_of(arch).build(arch, num_classes, width_mult, channels)


# --- the head, its embedding and its class activation maps --------------------------------

def _activation_grad(layer: nn.Module, z: torch.Tensor) -> torch.Tensor | None:
    """d layer(z) / dz elementwise, or None for layers that are the identity at eval time."""
    if isinstance(layer, nn.ReLU):
        return (z > 0).to(z.dtype)
    if isinstance(layer, nn.Hardswish):
        return torch.where(z < -3, torch.zeros_like(z), torch.where(z > 3, torch.ones_like(z), (2 * z + 3) / 6))
    if isinstance(layer, nn.Tanh):
        return 1 - torch.tanh(z) ** 2
    if isinstance(layer, nn.Sigmoid):
        s = torch.sigmoid(z)
        return s * (1 - s)
    if isinstance(layer, (nn.Dropout, nn.Identity)):
        return None
    raise TypeError(f"no gradient rule for head layer {layer.__class__.__name__}")


def _pool_matrix(size: int, out: int) -> torch.Tensor:
    """[out, size]: row i averages adaptive_avg_pool's window i (floor(i*size/out) .. ceil((i+1)*size/out)).
    Built in NumPy, so that an ONNX trace records it as a constant."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return torch.from_numpy(m)


def adaptive_avg_pool(layer: nn.AdaptiveAvgPool2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, also where its output size does not divide the input size (AlexNet's and
    VGG's 6x6 / 7x7 pools on inputs smaller than 224): then as two matrix products with the
    pooling windows, which the ONNX exporter can write (it refuses adaptive_avg_pool2d there)."""
    h, w = x.shape[-2:]
    oh, ow = (layer.output_size, layer.output_size) if isinstance(layer.output_size, int) else layer.output_size
    oh, ow = oh or h, ow or w
    if h % oh == 0 and w % ow == 0:
        return layer(x)
    rows, cols = _pool_matrix(h, oh).to(x), _pool_matrix(w, ow).to(x)
    return rows @ x @ cols.T


def head_outputs(head: list[nn.Module], features: torch.Tensor, want_cam: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run ``head`` on ``features`` [N, K, h, w]: (logits [N, C], embedding [N, D], cam [N, C, h, w] or None).

    The CAM needs d logits / d features, averaged over each map; it is computed backwards
    through the head's layers (linear: multiply by the weight; activation: by its
    derivative at the recorded input; flatten: reshape; average pooling: every pooled cell
    weighs its window in, so the mean gradient over the map is the pooled gradients' sum / (h*w))."""
    inputs: list[torch.Tensor] = []
    x = features
    for layer in head:
        inputs.append(x)
        if isinstance(layer, nn.AdaptiveAvgPool2d):
            x = adaptive_avg_pool(layer, x)
        else:
            x = layer(x.clone() if getattr(layer, "inplace", False) else x)  # keep the recorded input intact
    logits = x
    last = max(i for i, layer in enumerate(head) if isinstance(layer, nn.Linear))
    embedding = inputs[last]
    if not want_cam:
        return logits, embedding, None
    n, k, h, w = features.shape
    grad: torch.Tensor | None = None  # [N, C, d]: d logits / d (the current layer's input)
    alpha: torch.Tensor | None = None  # [N, C, K]: mean gradient over each feature map
    for layer, inp in zip(reversed(head), reversed(inputs)):
        if isinstance(layer, nn.Linear):
            grad = layer.weight.unsqueeze(0).expand(n, -1, -1) if grad is None else grad @ layer.weight
        elif isinstance(layer, nn.Flatten):
            assert grad is not None
            grad = grad.reshape(n, grad.shape[1], *inp.shape[1:])
        elif isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            assert grad is not None and grad.dim() == 5
            alpha = grad.sum(dim=(3, 4)) / (h * w)
            break
        else:
            d = _activation_grad(layer, inp)
            if d is not None:
                assert grad is not None
                grad = grad * d.unsqueeze(1)
    if alpha is None:  # no pooling layer: the gradient is per feature-map cell already
        assert grad is not None and grad.dim() == 5
        alpha = grad.mean(dim=(3, 4))
    cam = F.relu(torch.einsum("nck,nkhw->nchw", alpha, features))
    return logits, embedding, cam


def cam_cost(head: list[nn.Module], features_shape: tuple[int, int, int], classes: int) -> int:
    """Multiply-adds per image of :func:`head_outputs`' class activation maps: ``classes``
    times every hidden linear layer's size, plus the weighting of the [K, h, w] features.
    Small for a pooled linear head (ResNet, GoogLeNet); for MLP heads it grows with
    classes x hidden x inputs (1000-class VGG-16: about 10^11, a hundred times the network)."""
    k, h, w = features_shape
    linears = [m for m in head if isinstance(m, nn.Linear)]
    return classes * (sum(m.in_features * m.out_features for m in linears[:-1]) + k * h * w)
