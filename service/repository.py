"""The models one worker serves: each loaded, checked, warmed up and given a batcher.

Built from the repository on disk (core.repository). Anything broken stops start-up with
a message naming the file. Requests name ``name`` or ``name:version``; without a version
the highest one answers, without a name the default model of the endpoint's task.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from core.errors import DeviceUnavailable, InvalidModel, ModelNotFound, RepositoryError, WrongTask
from core.repository import ModelEntry, discover, version_key
from core.runtime import OnnxModel
from core.tasks import TASKS
from service.batching import DynamicBatcher
from service.settings import Settings

log = logging.getLogger("convserve.repository")


def check_repository(settings: Settings) -> list[ModelEntry]:
    """Check the repository without creating sessions: every model.onnx parses and its
    contract agrees with its graph; an explicit CUDA request can really be met.
    Raises RepositoryError naming the file."""
    from core.onnx_contract import read_contract

    found = discover(settings.model_root)
    for entry in found:
        try:
            read_contract(entry.path)
        except InvalidModel as exc:
            raise RepositoryError(f"{entry.path}: invalid model: {exc}") from None
    if settings.device == "cuda":
        from core.runtime import create_session

        try:
            create_session(found[0].path, "cuda", 1)
        except DeviceUnavailable as exc:
            raise RepositoryError(str(exc)) from None
    return found


@dataclass
class ServedModel:
    model: OnnxModel
    batcher: DynamicBatcher

    @property
    def ref(self) -> str:
        return f"{self.model.name}:{self.model.version}"

    def describe(self, default: bool) -> dict[str, Any]:
        c = self.model.contract
        return {
            "name": self.model.name, "version": self.model.version, "default_version": default,
            "task": c.task, "endpoint": f"/{TASKS[c.task].endpoint}", "labels": c.labels,
            "input": {"height": c.input.height, "width": c.input.width, "resize": c.input.resize,
                      "dtype": c.input.dtype, "layout": c.input.layout},
            "batch": {"dynamic": c.batch.dynamic, "size": c.batch.size, "max_batch": self.batcher.max_batch},
            "providers": self.model.providers,
            "provenance": {k: v for k, v in c.provenance.items() if k in ("architecture", "dataset", "metrics", "exported_at")},
        }


class ModelRepository:
    """All served models of one worker, plus the single inference thread they share."""

    def __init__(self, settings: Settings, on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.settings = settings
        # One inference thread: each run already uses ort_threads cores, so concurrent runs
        # would only oversubscribe them.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self.models: dict[str, dict[str, ServedModel]] = {}
        self.ready = False
        for entry in discover(settings.model_root):
            try:
                model = OnnxModel.load(entry.path, entry.name, entry.version, settings.device, settings.ort_threads)
            except InvalidModel as exc:
                raise RepositoryError(f"{entry.path}: invalid model: {exc}") from None
            fixed = model.contract.batch.max_size
            batcher = DynamicBatcher(
                model.infer, self.executor,
                max_batch=min(settings.max_batch, fixed) if fixed else settings.max_batch,
                max_wait_ms=settings.batch_wait_ms, max_queue=settings.max_queue,
                on_batch=(lambda n, s, ref=entry.ref: on_batch(ref, n, s)) if on_batch else None,
            )
            self.models.setdefault(entry.name, {})[entry.version] = ServedModel(model, batcher)
            log.info("loaded %s (%s) from %s on %s", entry.ref, model.contract.task, entry.path, model.providers)

    def warm_up(self) -> None:
        """Run every model at its largest batch and at one image, so first requests pay no set-up cost."""
        for versions in self.models.values():
            for served in versions.values():
                i = served.model.contract.input
                for n in sorted({served.batcher.max_batch, 1}, reverse=True):
                    served.model.infer(np.full((n, i.height, i.width, 3), i.pad_value, np.uint8))
        self.ready = True

    def default_version(self, name: str) -> str:
        return max(self.models[name], key=version_key)

    def resolve(self, ref: str | None, task: str) -> ServedModel:
        """The model a request names (``name`` or ``name:version``; empty: the first model of
        ``task`` by name). Raises ModelNotFound or WrongTask."""
        if not ref:
            candidates = sorted(n for n, vs in self.models.items()
                                if vs[self.default_version(n)].model.contract.task == task)
            if not candidates:
                raise ModelNotFound(f"no {task} model is loaded")
            ref = candidates[0]
        name, _, version = ref.partition(":")
        if name not in self.models:
            raise ModelNotFound(f"unknown model {name!r}; loaded: {sorted(self.models)}")
        version = version or self.default_version(name)
        if version not in self.models[name]:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {sorted(self.models[name])}")
        served = self.models[name][version]
        actual = served.model.contract.task
        if actual != task:
            raise WrongTask(f"model {name}:{version} is a {actual} model, not {task}; use /{TASKS[actual].endpoint}")
        return served

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.models):
            default = self.default_version(name)
            for version, served in sorted(self.models[name].items(), key=lambda kv: version_key(kv[0])):
                out.append(served.describe(version == default))
        return out
