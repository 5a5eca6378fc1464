"""The benchmark's extra models: MobileNetV3-Large and ResNet-18 classifiers at 224x224,
made by this project's own training and export (one optimiser step on synthetic data:
the weights do not matter for speed, the graphs are what users export).

    python -m loadtest.bench_models --out bench-models
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from export.onnx_export import export
from training.synthetic import write_classification
from training.train import TrainConfig, train

MODELS = {"mobilenet-v3-large": "mobilenet_v3_large", "resnet18": "resnet18"}


def make(out: Path, size: int = 224) -> list[Path]:
    """Train one step and export each of MODELS into the repository ``out``."""
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_classification(data / "train", 20, seed=1)
        write_classification(data / "val", 10, seed=2)
        for name, arch in MODELS.items():
            cfg = TrainConfig(task="classification", train=str(data / "train"), val=str(data / "val"), arch=arch,
                              size=size, epochs=1, batch_size=10, workers=0, max_steps=1)
            train(cfg, Path(tmp) / name)
            path, _ = export(Path(tmp) / name / "best.pt", name, "1", out, "synthetic shapes, one step (benchmark)",
                             data / "val", 4)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-models"))
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args(argv)
    for path in make(a.out, a.size):
        print(path)


if __name__ == "__main__":
    main()
