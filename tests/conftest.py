"""Shared fixtures: tiny synthetic datasets, tiny exported models, and a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.archs import ARCHS
from tests.support.servers import SHIPPED_MODELS, Server, start_server, stop_server

# The fixtures below that train, export or start a server: every test that uses one of them,
# itself or through another fixture, is marked slow. Tests that start a server, train, export,
# build a container or drive wrk or Chromium on their own carry an explicit slow mark.
SLOW_FIXTURES = frozenset({"tiny_checkpoints", "tiny_repo", "tiny_served_repo", "tiny_arch_repo",
                           "server", "tiny_server"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small train/val sets of every format, written by the synthetic generator."""
    from training.figures import write_keypoints
    from training.synthetic import write_classification, write_detection, write_instances, write_segmentation

    root = tmp_path_factory.mktemp("data")
    write_classification(root / "cls" / "train", 40, seed=11)
    write_classification(root / "cls" / "val", 15, seed=12)
    write_segmentation(root / "seg" / "train", 16, seed=11)
    write_segmentation(root / "seg" / "val", 8, seed=12)
    write_detection(root / "det" / "train", 16, seed=11)
    write_detection(root / "det" / "val", 8, seed=12)
    write_instances(root / "ins" / "train", 12, seed=11)
    write_instances(root / "ins" / "val", 4, seed=12)
    write_keypoints(root / "kp" / "train", 12, seed=11)
    write_keypoints(root / "kp" / "val", 4, seed=12)
    return root


def _train(task: str, arch: str, data: Path, out: Path, size: int, width: float, steps: int) -> Path:
    from training.train import TrainConfig, train

    cfg = TrainConfig(task=task, train=str(data / "train"), val=str(data / "val"), arch=arch, size=size,
                      width_mult=width, epochs=1, batch_size=8, lr=1e-3, workers=0, max_steps=steps)
    train(cfg, out)
    return out / "best.pt"


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few optimiser steps per task: enough for real export and parity checks."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "classification": _train("classification", "mobilenet_v3_small", tiny_data / "cls", root / "cls",
                                 64, 0.5, 3),
        "segmentation": _train("segmentation", "lraspp_mobilenet_v3_large", tiny_data / "seg", root / "seg",
                               64, 0.5, 2),
        "detection": _train("detection", "centernet_mobilenet_v3_small", tiny_data / "det", root / "det",
                            128, 0.5, 2),
    }


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoints: dict[str, Path], tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository of the tiny models, exported through export.onnx_export."""
    from export.onnx_export import export

    root = tmp_path_factory.mktemp("models")
    sub = {"classification": "cls", "segmentation": "seg", "detection": "det"}
    for task, ck in tiny_checkpoints.items():
        export(ck, f"tiny-{sub[task]}", "1", root, "tiny synthetic", tiny_data / sub[task] / "val", 8)
    return root


@pytest.fixture(scope="session")
def tiny_served_repo(tiny_repo: Path, tiny_checkpoints: dict[str, Path], tiny_data: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models plus fixed-batch exports (size 1 and 3) of the classifier and segmenter."""
    import shutil

    from export.onnx_export import export

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_repo, root, dirs_exist_ok=True)
    for task, sub in (("classification", "cls"), ("segmentation", "seg")):
        for size in (1, 3):
            export(tiny_checkpoints[task], f"tiny-{sub}-fixed{size}", "1", root, "tiny synthetic",
                   tiny_data / sub / "val", 4, fixed_batch=size)
    return root


@pytest.fixture(scope="session")
def tiny_grey_data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny classification sets as greyscale PNGs (for LeNet-5 and one-channel graphs)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("grey")
    for split in ("train", "val"):
        for path in sorted((tiny_data / "cls" / split).rglob("*.jpg")):
            out = root / split / path.parent.name / (path.stem + ".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("L").save(out)
    return root


@pytest.fixture(scope="session")
def tiny_arch_repo(tiny_data: Path, tiny_grey_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every architecture of ARCHS trained two steps and exported (with parity) into one repository;
    returns {arch: checkpoint} and the repository under the key "repo"."""
    from export.onnx_export import export
    from training.train import TrainConfig, train

    runs, repo = tmp_path_factory.mktemp("arch-runs"), tmp_path_factory.mktemp("arch-models")
    out: dict[str, Path] = {"repo": repo}
    for task, arch, data, size, width, extras in ARCHS:
        root = tiny_grey_data if data == "grey" else tiny_data / data
        cfg = TrainConfig(task=task, train=str(root / "train"), val=str(root / "val"), arch=arch, size=size,
                          width_mult=width, epochs=1, batch_size=4, lr=1e-3, workers=0, max_steps=2)
        train(cfg, runs / arch)
        out[arch] = runs / arch / "best.pt"
        export(out[arch], arch.replace("_", "-"), "1", repo, "tiny synthetic", root / "val", 4, extras=extras)
    return out


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real service on the shipped models/ (CPU)."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    srv = start_server(SHIPPED_MODELS, log, env={"CONVSERVE_DEVICE": "cpu"})
    yield srv
    stop_server(srv.proc)


@pytest.fixture(scope="session")
def tiny_server(tiny_served_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real service on the tiny models, dynamic and fixed-batch (CPU)."""
    log = tmp_path_factory.mktemp("tiny-server") / "serve.log"
    srv = start_server(tiny_served_repo, log, env={"CONVSERVE_DEVICE": "cpu"})
    yield srv
    stop_server(srv.proc)
