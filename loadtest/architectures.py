"""Every architecture of training.models at its default input size: parameters, ONNX size,
and ONNX Runtime's CPU latency at batch 1 and throughput at batch 8 on this machine.

Usage (README "Architectures")::

    python -m loadtest.architectures --out arch.json            # all of them (about 15 min on 2 cores)
    python -m loadtest.architectures --arch resnet18,vgg16 --threads 2

Random weights (speed does not depend on them); each graph is exported with
export.onnx_export.to_onnx as training would export it (the task's outputs; ``--extras``
adds a classifier's embedding and class activation maps), loaded with the service's session
options (core.runtime), warmed up, then timed: median of ``--repeats`` single-image runs,
and images per second over batches of 8 for ``--seconds``. The one-image-per-call detectors
(SSDlite, Faster R-CNN) report their throughput one image at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.runtime import OnnxModel

CLASSES = {"classification": 1000, "segmentation": 21, "detection": 80, "instance_segmentation": 80,
           "keypoints": 1}  # ImageNet / VOC / COCO (instances, person keypoints) sized heads


def _coco_person() -> Any:
    """COCO's 17 person keypoints (pycocotools' sigmas): what a keypoint head is sized for here."""
    from core.contract import KeypointSpec
    from core.datasets import COCO_KEYPOINT_SIGMAS

    return KeypointSpec(list(COCO_KEYPOINT_SIGMAS), [], list(COCO_KEYPOINT_SIGMAS.values()))


KEYPOINTS = {"keypoints": _coco_person}  # the keypoint spec each keypoint task's heads are sized for


def measure(task: str, arch: str, size: int | None, threads: int, repeats: int, seconds: float,
            extras: bool = False) -> dict[str, Any]:
    import onnx

    from export.onnx_export import attach_contract, to_onnx
    from training.graph import graph_contract
    from training.models import build_model, default_size

    size = size or default_size(arch)
    classes = [f"c{i}" for i in range(CLASSES[task])]
    model = build_model(task, arch, len(classes), keypoints=KEYPOINTS[task]() if task in KEYPOINTS else None).eval()
    if extras:
        model.with_extras(model.extras)  # every optional output the architecture has (classifiers: embedding, cam)
    contract = graph_contract(model, task, classes, size)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        to_onnx(model.export_module().eval(), model, contract, path)
        export_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        onnx.save(attach_contract(path, contract), str(path))
        served = OnnxModel.load(path, arch, "1", "cpu", threads)
        x = np.random.default_rng(0).integers(0, 256, (8, size, size, contract.input.channels), np.uint8)
        served.infer(x[:1])
        served.infer(x)
        lat = []
        for _ in range(repeats):
            t = time.perf_counter()
            served.infer(x[:1])
            lat.append((time.perf_counter() - t) * 1e3)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds or n == 0:
            served.infer(x)
            n += len(x)
        throughput = n / (time.perf_counter() - t)
    return {"task": task, "architecture": arch, "input": size, "params_m": round(params / 1e6, 2),
            "onnx_mb": round(size_mb, 1), "latency_b1_ms": round(statistics.median(lat), 1),
            "throughput_b8_img_s": round(throughput, 1), "export_s": round(export_s, 1),
            "batch": "dynamic" if contract.batch.dynamic else f"fixed {contract.batch.size}"}


def main(argv: list[str] | None = None) -> None:
    from training.models import ARCHITECTURES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", help="comma-separated architectures (default: all)")
    p.add_argument("--size", type=int, help="input side for all (default: each architecture's)")
    p.add_argument("--threads", type=int, default=2,
                   help="ONNX Runtime intra-op threads (default 2: this machine's cores)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--extras", action="store_true", help="classifiers with their embedding and CAM outputs")
    p.add_argument("--classes", type=int, help="class count for every head (default: 1000 / 21 / 80 by task)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    wanted = a.arch.split(",") if a.arch else None
    rows = []
    for task, archs in ARCHITECTURES.items():
        for arch in archs:
            if wanted and arch not in wanted:
                continue
            if a.classes:
                CLASSES[task] = a.classes
            row = measure(task, arch, a.size, a.threads, a.repeats, a.seconds, a.extras)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| task | architecture | input | parameters | ONNX | batch 1 latency | batch 8 throughput |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | `{r['architecture']}` | {r['input']} | {r['params_m']} M | {r['onnx_mb']} MiB | "
              f"{r['latency_b1_ms']} ms | {r['throughput_b8_img_s']} img/s |")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
