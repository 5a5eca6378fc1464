"""The baseline anyone would write first: FastAPI + ONNX Runtime, one image per call.

No batching, plain ``Image.open(...).convert("RGB")`` (no draft decoding, no limits), a
synchronous endpoint that FastAPI runs in its thread pool, one ONNX Runtime session per
model with the same thread count as the service. Postprocessing reuses the service's own
functions so both servers return the same kind of answer and only the serving path differs.

    python -m loadtest.naive_server --port 3001 [--model-root models]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from service import postprocess
from service.preprocess import prepare
from service.repository import discover
from service.runtime import OnnxModel
from service.settings import Settings


def build_app(model_root: Path, threads: int) -> FastAPI:
    app = FastAPI(title="naive baseline")
    models: dict[str, OnnxModel] = {}
    for name, version, path in discover(model_root):
        m = OnnxModel.load(path, name, version, "auto", threads)
        models.setdefault(m.contract.task, m)

    def run(task: str, data: bytes) -> tuple[OnnxModel, dict[str, np.ndarray], object]:
        m = models[task]
        c = m.contract.input
        img = Image.open(io.BytesIO(data)).convert("RGB")
        arr, geo = prepare(img, c.width, c.height, c.resize, c.pad_value)
        out = m.run(arr[None])
        return m, {k: v[0] for k, v in out.items()}, geo

    @app.post("/classify")
    def classify(image: UploadFile = File(...)) -> dict:
        m, out, _ = run("classification", image.file.read())
        c = m.contract
        return {"labels": postprocess.top_k(out[c.outputs.scores], c.outputs.kind, c.labels, 5)}

    @app.post("/detect")
    def detect(image: UploadFile = File(...)) -> dict:
        m, out, geo = run("detection", image.file.read())
        o = m.contract.outputs
        return {"detections": postprocess.detections(out[o.boxes], out[o.scores], out[o.labels], geo,
                                                     m.contract.labels, 0.3, 100)}

    @app.post("/segment")
    def segment(image: UploadFile = File(...)) -> dict:
        m, out, geo = run("segmentation", image.file.read())
        c = m.contract
        return postprocess.segments(postprocess.class_map(out[c.outputs.masks], c.outputs.kind, geo), c.labels, "rle")

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    settings = Settings.from_env()
    p = argparse.ArgumentParser(description="naive FastAPI + ONNX Runtime baseline")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3001)
    p.add_argument("--model-root", type=Path, default=settings.model_root)
    p.add_argument("--threads", type=int, default=settings.ort_threads)
    a = p.parse_args(argv)
    uvicorn.run(build_app(a.model_root, a.threads), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
