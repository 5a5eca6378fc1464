"""Score an exported ONNX model on a dataset directory through ONNX Runtime (not PyTorch).

Usage::

    python -m export.evaluate models/shapes-classifier/1/model.onnx --data data/cls/val

Images are decoded, resized and post-processed by the service's own code, so the figures
are what the service would score. Prints the task's metrics as JSON: top-1/top-5 for
classification, per-class IoU and mIoU for segmentation (at original image size), COCO
mAP@[.5:.95] and mAP@.5 (pycocotools) for detection (boxes in original pixels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from service import postprocess
from service.imaging import to_rgb
from service.preprocess import Geometry, prepare
from service.runtime import OnnxModel
from training.metrics import ClassificationMeter, ConfusionMatrix, coco_detection_metrics, load_coco


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _load(path: Path, model: OnnxModel) -> tuple[np.ndarray, Geometry]:
    c = model.contract.input
    with Image.open(path) as im:
        return prepare(to_rgb(im), c.width, c.height, c.resize, c.pad_value)


def _run(model: OnnxModel, paths: list[Path], batch_size: int) -> Iterator[tuple[Path, dict[str, np.ndarray], Geometry]]:
    """Per image: (path, that image's outputs, geometry), running fixed-batch graphs one by one."""
    bs = batch_size if model.contract.batch.dynamic else (model.contract.batch.size or 1)
    for chunk in _batches(paths, bs):
        loaded = [_load(p, model) for p in chunk]
        out = model.run(np.stack([a for a, _ in loaded]))
        for i, (p, (_, geo)) in enumerate(zip(chunk, loaded)):
            yield p, {k: (v[i] if model.contract.batch.dynamic else v) for k, v in out.items()}, geo


def evaluate(onnx_path: Path, data: Path, batch_size: int = 16, threads: int = 2) -> dict[str, Any]:
    """Metrics of ``onnx_path`` on ``data`` (ImageFolder / COCO / mask-PNG layout by task)."""
    model = OnnxModel.load(onnx_path, onnx_path.parent.parent.name, onnx_path.parent.name, "auto", threads)
    c = model.contract
    if c.task == "classification":
        classes = sorted(p.name for p in data.iterdir() if p.is_dir())
        unknown = [n for n in classes if n not in c.labels]
        if unknown:
            raise SystemExit(f"{data}: class folders {unknown} are not among the model's labels {c.labels}")
        samples = [(f, c.labels.index(n)) for n in classes for f in sorted((data / n).iterdir()) if f.is_file()]
        meter = ClassificationMeter(len(c.labels))
        targets = dict(samples)
        for p, out, _ in _run(model, [s for s, _ in samples], batch_size):
            meter.update(out[c.outputs.scores][None], np.array([targets[p]]))
        return meter.compute()
    if c.task == "segmentation":
        cm = ConfusionMatrix(len(c.labels))
        images = sorted(p for p in (data / "images").iterdir() if p.is_file())
        for p, out, geo in _run(model, images, batch_size):
            cmap = postprocess.class_map(out[c.outputs.masks], c.outputs.kind, geo)
            cm.update(cmap, np.asarray(Image.open(data / "masks" / f"{p.stem}.png")))
        return cm.compute(c.labels)
    coco = load_coco(str(data / "annotations.json"))
    cats = {cat["name"]: cat["id"] for cat in coco.loadCats(coco.getCatIds())}
    infos = coco.loadImgs(sorted(coco.getImgIds()))
    by_path = {data / "images" / i["file_name"]: i["id"] for i in infos}
    dets: list[dict[str, Any]] = []
    o = c.outputs
    for p, out, geo in _run(model, list(by_path), batch_size):
        for d in postprocess.detections(out[o.boxes], out[o.scores], out[o.labels], geo, c.labels, 0.001, 100):
            if d["label"] not in cats:
                continue
            x1, y1, x2, y2 = d["box"]
            dets.append({"image_id": by_path[p], "category_id": cats[d["label"]],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]})
    return coco_detection_metrics(coco, dets)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Evaluate an ONNX model through ONNX Runtime.")
    p.add_argument("model", type=Path, help="path to model.onnx")
    p.add_argument("--data", type=Path, required=True, help="dataset directory in the task's format")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    a = p.parse_args(argv)
    print(json.dumps({"model": str(a.model), "data": str(a.data), **evaluate(a.model, a.data, a.batch_size, a.threads)}))


if __name__ == "__main__":
    main()
