"""Every architecture trains, exports with parity and says what its graph takes and gives;
the in-graph class activation maps are Grad-CAM as autograd computes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.imaging import load_input
from core.onnx_contract import read_contract
from core.runtime import OnnxModel
from tests.support.archs import ARCHS
from training.datasets import data_channels
from training.models import build_model, default_size
from training.visualize import grad_cam, load_classifier


def _model_path(repo: dict[str, Path], arch: str) -> Path:
    return repo["repo"] / arch.replace("_", "-") / "1" / "model.onnx"


@pytest.mark.parametrize("task,arch,data,size,width,extras", ARCHS, ids=[a[1] for a in ARCHS])
def test_every_architecture_trains_and_exports_with_parity(tiny_arch_repo, task, arch, data, size, width,
                                                           extras) -> None:
    path = _model_path(tiny_arch_repo, arch)
    c = read_contract(path)
    assert c.task == task and c.provenance["architecture"] == arch and c.input.height == size
    assert c.provenance["parity"]["images"] == 4  # the export compared PyTorch and ONNX Runtime on real images
    for name in ("embedding", "cam"):
        assert (getattr(c.outputs, name) == name) == (name in extras)
    model = OnnxModel.load(path, arch, "1", "cpu", 2)
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, c.input.channels), np.uint8)
    outs = model.infer(x[:1]) if not c.batch.dynamic else model.infer(x)
    if task == "classification":
        n = len(c.labels)
        assert outs[0]["logits"].shape == (n,) and outs[0]["embedding"].ndim == 1
        assert outs[0]["cam"].shape[0] == n and outs[0]["cam"].ndim == 3 and (outs[0]["cam"] >= 0).all()


def test_lenet_takes_its_channels_from_the_data(tiny_arch_repo, tiny_grey_data, tiny_data) -> None:
    assert data_channels("classification", tiny_grey_data / "train") == 1
    assert data_channels("classification", tiny_data / "cls" / "train") == 3
    c = read_contract(_model_path(tiny_arch_repo, "lenet5"))
    assert (c.input.channels, c.input.color) == (1, "L")
    graph = onnx.load(str(_model_path(tiny_arch_repo, "lenet5")), load_external_data=False)
    dims = [d.dim_value or d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [32, 32, 1]
    assert default_size("lenet5") == 32 and default_size("vgg16") == 224 and default_size("googlenet") == 224


def test_googlenet_trains_its_auxiliary_heads_and_exports_without_them(tiny_arch_repo) -> None:
    model = build_model("classification", "googlenet", 3).train()
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    model.loss(x, torch.tensor([0, 2])).backward()
    assert model.core.aux1.fc2.weight.grad is not None and model.core.aux2.fc2.weight.grad.abs().sum() > 0
    graph = onnx.load(str(_model_path(tiny_arch_repo, "googlenet")))
    names = [i.name for i in graph.graph.initializer]
    assert names and not any("aux" in n for n in names)
    sizes = {n: np.prod(i.dims) for n, i in zip(names, graph.graph.initializer)}
    aux = sum(p.numel() for n, p in model.core.named_parameters() if n.startswith("aux"))
    assert sum(sizes.values()) < sum(p.numel() for p in model.parameters()) - aux * 0.9


@pytest.mark.parametrize("arch", ["lenet5", "alexnet", "vgg11_bn", "googlenet", "resnet18", "mobilenet_v3_large"])
def test_in_graph_cam_is_grad_cam(tiny_arch_repo, tiny_data, tiny_grey_data, arch) -> None:
    """The ONNX graph's cam output (no gradients: the head's derivative written out) against
    autograd's Grad-CAM of the checkpoint, for every class of real images."""
    model, cfg = load_classifier(tiny_arch_repo[arch])
    onnx_model = OnnxModel.load(_model_path(tiny_arch_repo, arch), arch, "1", "cpu", 1)
    data = tiny_grey_data if arch == "lenet5" else tiny_data / "cls"
    images = sorted((data / "val").rglob("*.*"))[:3]
    nonzero = 0
    for image in images:
        _, arr, _ = load_input(image, onnx_model.contract.input)
        cam = onnx_model.infer(arr[None])[0]["cam"]
        for k in range(cam.shape[0]):
            want = grad_cam(model, torch.from_numpy(np.ascontiguousarray(arr))[None], k)
            scale = max(float(np.abs(want).max()), 1e-6)
            np.testing.assert_allclose(cam[k], want, atol=1e-3 * scale + 1e-7, err_msg=f"{image.name} class {k}")
            nonzero += want.max() > 0
    assert nonzero > 0  # not a comparison of zeros with zeros
