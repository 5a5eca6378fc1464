"""Transfer learning both ways: fine-tuning (every layer trains from a weights file) and feature
extraction (--freeze backbone: only the new head trains); the head is replaced when the class
count differs, and weights that do not fit are a clear error naming the file and the key.

Nothing can be downloaded here, so the "pretrained" file is a briefly trained ResNet-18
saved as a plain torchvision state dict (the format of torchvision's ImageNet files)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.servers import ROOT
from training.models import WeightsError, build_model
from training.train import TrainConfig, train

pytestmark = pytest.mark.slow  # every test trains

SIZE = 32


@pytest.fixture(scope="module")
def pretrained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("pretrain")
    cfg = TrainConfig(task="classification", train=str(tiny_data / "cls" / "train"), val=str(tiny_data / "cls" / "val"),
                      arch="resnet18", size=SIZE, epochs=1, batch_size=8, workers=0, max_steps=3)
    train(cfg, runs)
    ck = torch.load(runs / "last.pt", weights_only=True)
    state = {k.removeprefix("core."): v for k, v in ck["model"].items()}
    path = runs / "resnet18-shapes.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def three_classes(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny classification sets with three of their five classes."""
    root = tmp_path_factory.mktemp("three")
    for split in ("train", "val"):
        for cls in ("circle", "square", "star"):
            shutil.copytree(tiny_data / "cls" / split / cls, root / split / cls)
    return root


def _train(data: Path, out: Path, **kw) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(task="classification", train=str(data / "train"), val=str(data / "val"),
                      arch=kw.pop("arch", "resnet18"), size=SIZE, epochs=1, batch_size=8, lr=1e-2, workers=0,
                      max_steps=4, **kw)
    train(cfg, out)
    ck = torch.load(out / "last.pt", weights_only=True)
    return {k.removeprefix("core."): v for k, v in ck["model"].items()}


def test_feature_extraction_trains_the_head_only(pretrained, tiny_data, tmp_path) -> None:
    start = torch.load(pretrained, weights_only=True)
    after = _train(tiny_data / "cls", tmp_path / "fx", weights=str(pretrained), freeze="backbone")
    backbone = [k for k in start if not k.startswith("fc.")]
    assert len(backbone) > 100
    for k in backbone:  # parameters and batch-norm statistics alike
        assert torch.equal(after[k], start[k]), k
    assert not torch.equal(after["fc.weight"], start["fc.weight"])


def test_fine_tuning_trains_every_layer(pretrained, tiny_data, tmp_path) -> None:
    start = torch.load(pretrained, weights_only=True)
    after = _train(tiny_data / "cls", tmp_path / "ft", weights=str(pretrained))
    assert not torch.equal(after["fc.weight"], start["fc.weight"])
    assert not torch.equal(after["conv1.weight"], start["conv1.weight"])
    assert not torch.equal(after["layer2.0.conv1.weight"], start["layer2.0.conv1.weight"])


def test_the_head_is_replaced_for_another_class_count(pretrained, three_classes, tmp_path, capsys) -> None:
    start = torch.load(pretrained, weights_only=True)
    assert start["fc.weight"].shape[0] == 5
    after = _train(three_classes, tmp_path / "three", weights=str(pretrained), freeze="backbone")
    assert "head (fc.weight, fc.bias) starts fresh" in capsys.readouterr().out
    assert after["fc.weight"].shape == (3, 512) and after["fc.bias"].shape == (3,)
    assert all(torch.equal(after[k], start[k]) for k in start if not k.startswith("fc."))


def test_weights_of_another_architecture_name_the_file_and_the_key(pretrained, tmp_path) -> None:
    with pytest.raises(WeightsError, match=rf"^{pretrained}: does not fit this architecture: first mismatching key "
                                           r"'layer1\.2\.conv1\.weight' is missing from the file"):
        build_model("classification", "resnet34", 5, weights=pretrained)
    state = torch.load(pretrained, weights_only=True)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match=r"first mismatching key 'layer2\.0\.conv1\.weight' "
                                           r"has shape \[128, 64, 5, 5\] in the file, "
                                           r"\[128, 64, 3, 3\] in the model"):
        build_model("classification", "resnet18", 5, weights=bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth: not a readable state-dict file"):
        build_model("classification", "resnet18", 5, weights=tmp_path / "junk.pth")


def test_the_cli_says_it_in_one_line(pretrained, tiny_data, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "training.train", "classification",
                        "--train", str(tiny_data / "cls" / "train"),
                        "--val", str(tiny_data / "cls" / "val"), "--out", str(tmp_path / "x"), "--arch", "resnet34",
                        "--size", "32", "--weights", str(pretrained), "--workers", "0", "--max-steps", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{pretrained}: does not fit this architecture: first mismatching key 'layer1.2.conv1.weight'" in r.stderr


def test_our_own_checkpoint_is_a_weights_file_too(pretrained, tiny_data, tmp_path) -> None:
    _train(tiny_data / "cls", tmp_path / "a")
    model = build_model("classification", "resnet18", 5, weights=tmp_path / "a" / "best.pt")
    ck = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    assert torch.equal(model.core.conv1.weight, ck["model"]["core.conv1.weight"])
