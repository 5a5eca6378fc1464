"""Shared fixtures: tiny synthetic datasets, tiny exported models, and a real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from loadtest.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small train/val sets of every format, written by the synthetic generator."""
    from training.synthetic import write_classification, write_detection, write_segmentation

    root = tmp_path_factory.mktemp("data")
    write_classification(root / "cls" / "train", 40, seed=11)
    write_classification(root / "cls" / "val", 15, seed=12)
    write_segmentation(root / "seg" / "train", 16, seed=11)
    write_segmentation(root / "seg" / "val", 8, seed=12)
    write_detection(root / "det" / "train", 16, seed=11)
    write_detection(root / "det" / "val", 8, seed=12)
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
        "classification": _train("classification", "mobilenet_v3_small", tiny_data / "cls", root / "cls", 64, 0.5, 3),
        "segmentation": _train("segmentation", "lraspp_mobilenet_v3_large", tiny_data / "seg", root / "seg", 64, 0.5, 2),
        "detection": _train("detection", "centernet_mobilenet_v3_small", tiny_data / "det", root / "det", 128, 0.5, 2),
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


# The architectures of training.models at test sizes: (task, arch, data, input side, width multiplier,
# extras). Trained two steps and exported with parity by tiny_arch_repo, served by tests/service.
ARCHS = [
    ("classification", "lenet5", "grey", 32, 1.0, ("embedding", "cam")),
    ("classification", "alexnet", "cls", 64, 0.125, ("embedding", "cam")),
    ("classification", "vgg11", "cls", 32, 0.125, ("embedding", "cam")),
    ("classification", "vgg11_bn", "cls", 32, 0.125, ("embedding", "cam")),
    ("classification", "vgg16", "cls", 32, 0.0625, ("embedding", "cam")),
    ("classification", "vgg16_bn", "cls", 32, 0.0625, ("embedding", "cam")),
    ("classification", "googlenet", "cls", 64, 1.0, ("embedding", "cam")),
    ("classification", "resnet18", "cls", 32, 1.0, ("embedding", "cam")),
    ("classification", "resnet34", "cls", 32, 1.0, ("embedding", "cam")),
    ("classification", "resnet50", "cls", 32, 1.0, ("embedding", "cam")),
    ("classification", "mobilenet_v3_large", "cls", 64, 0.5, ("embedding", "cam")),
    ("segmentation", "fpn_mobilenet_v3_large", "seg", 64, 0.5, ()),
    ("segmentation", "deeplabv3_mobilenet_v3_large", "seg", 64, 0.5, ()),
    ("segmentation", "fcn_resnet50", "seg", 64, 1.0, ()),
    ("segmentation", "deeplabv3_resnet50", "seg", 64, 1.0, ()),
    ("detection", "fasterrcnn_mobilenet_v3_large_320_fpn", "det", 128, 1.0, ()),
]


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


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model_root: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 120.0,
                 ready_headers: dict[str, str] | None = None) -> Server:
    """``bentoml serve`` on a free loopback port; returns once /readyz answers 200 (asked with
    ``ready_headers``, e.g. an API key when health is closed)."""
    import urllib.request

    port = free_port()
    # Each server gets its own BENTOML_HOME: BentoML keeps its Prometheus multiprocess files
    # there, and two servers sharing one directory corrupt each other's /metrics.
    home = log.parent / f"bentoml-home-{port}"
    full_env = {**os.environ, "CONVSERVE_MODEL_ROOT": str(model_root), "BENTOML_DO_NOT_TRACK": "true",
                "BENTOML_HOME": str(home), **(env or {})}
    fh = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.service:ConvServe", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/readyz", headers=ready_headers or {}),
                                        timeout=2) as r:
                if r.status == 200:
                    return Server(proc, url, log)
        except Exception:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


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
