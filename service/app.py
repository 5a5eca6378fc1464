"""The FastAPI app BentoML mounts at /: convserve's raw routes (service.routes.ROUTES: one
inference route per endpoint and the Open Inference Protocol v2), /models, /admin/reload and
the playground. The request path of the raw routes is service.asgi; their OpenAPI
description is service.schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.staticfiles import StaticFiles

from core import __version__
from service.asgi import add_raw_route
from service.routes import ROUTES
from service.schemas import ERROR_RESPONSES, ErrorBody, ModelList, ReloadAnswer
from service.worker import worker_of

STATIC = Path(__file__).resolve().parent / "static"

app = FastAPI(title="convserve", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)
for _route in ROUTES:
    add_raw_route(app.router, _route.path, _route.handler, _route.methods, **_route.doc)


@app.get("/models", tags=["models"], summary="Every loaded model", response_model=ModelList,
         responses={401: ERROR_RESPONSES[401]})
def list_models(request: Request) -> dict[str, Any]:
    """Every loaded model (task, endpoints, labels, input, outputs, batch, the providers it really
    runs on, provenance), and the files a reload refused, with why."""
    repo = worker_of(request.app).repo
    return {"models": repo.describe(), "errors": repo.refused()}


@app.post("/admin/reload", tags=["admin"], summary="Look at the model repository now", response_model=ReloadAnswer,
          responses={401: {"description": "no valid admin key", "model": ErrorBody},
                     403: {"description": "no admin key is configured (CONVSERVE_ADMIN_KEYS)", "model": ErrorBody}})
async def reload_models(request: Request) -> dict[str, Any]:
    """Load new or replaced versions and drop removed ones in this worker at once (every
    worker also looks every CONVSERVE_POLL_S seconds). Needs an admin key."""
    repo = worker_of(request.app).repo
    report = await repo.reload()
    return {**report.as_dict(), "models": [m["name"] + ":" + m["version"] for m in repo.describe()],
            "errors": repo.refused()}


app.mount("/playground", StaticFiles(directory=STATIC / "playground", html=True), name="playground")

__all__ = ["app"]
