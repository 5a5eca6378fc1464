"""The baseline anyone would write first: FastAPI + ONNX Runtime, one image per call.

No batching, plain ``Image.open(...).convert("RGB")`` (no draft decoding, no limits), a
synchronous endpoint that FastAPI runs in its thread pool, one ONNX Runtime session per
model with the same thread count as the service. Results come from the same task functions
(core.tasks, default options) so both servers return the same kind of answer and only the
serving path differs.

    python -m loadtest.naive_server --port 3001 [--model-root models]
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image

from core.geometry import resize_to_input
from core.repository import discover
from core.runtime import OnnxModel
from core.tasks import TASKS
from service.endpoints import TASK_ENDPOINTS
from service.settings import Settings


def build_app(model_root: Path, threads: int) -> FastAPI:
    app = FastAPI(title="naive baseline")
    models: dict[str, OnnxModel] = {}
    for entry in discover(model_root):
        models[entry.ref] = OnnxModel.load(entry.path, entry.name, entry.version, "auto", threads)

    def run(task_name: str, data: bytes, name: str) -> dict:
        m = models[name] if name else next(m for m in models.values() if m.contract.task == task_name)
        task = TASKS[task_name]
        img = Image.open(io.BytesIO(data)).convert("RGB")
        arr, geo = resize_to_input(img, m.contract.input)
        out = m.infer(arr[None])[0]
        return task.result(out, geo, m.contract, task.defaults)

    def route(task_name: str) -> Callable[..., dict]:
        def answer(image: UploadFile = File(...), model: str = Form("")) -> dict:
            return run(task_name, image.file.read(), model)
        return answer

    for endpoint in TASK_ENDPOINTS.values():  # the service's task routes: /classify, /detect, ...
        app.post(f"/{endpoint.name}")(route(endpoint.task.name))

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
