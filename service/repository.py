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
    """Check the repository as a worker will load it: every model.onnx opens in ONNX Runtime
    (on CPU) with a contract that agrees with its graph; an explicit CUDA request can really
    be met. Raises RepositoryError naming the file."""
    found = discover(settings.model_root)
    for entry in found:
        try:
            model = OnnxModel.load(entry.path, entry.name, entry.version, "cpu", 1)
        except InvalidModel as exc:
            raise RepositoryError(f"{entry.path}: invalid model: {exc}") from None
        try:
            warm_up(model, settings.max_batch_for(model.providers), 1)
        except Exception as exc:  # whatever the graph raises: the worker's warm-up would too
            raise RepositoryError(f"{entry.path}: the model fails on a warm-up batch: {exc}") from None
    if settings.device == "cuda":
        from core.runtime import create_session

        try:
            create_session(found[0].path, "cuda", 1)
        except DeviceUnavailable as exc:
            raise RepositoryError(str(exc)) from None
    return found


def warm_up(model: OnnxModel, max_batch: int, concurrent: int, executor: ThreadPoolExecutor | None = None) -> None:
    """Run ``model`` as hard as serving will: its largest batch ``concurrent`` times at once,
    then one image. ONNX Runtime's memory then holds what serving needs, and neither first
    requests nor new batch sizes pay set-up time or grow it much."""
    i = model.contract.input
    largest = np.full((min(max_batch, model.contract.batch.max_size or max_batch), i.height, i.width, 3),
                      i.pad_value, np.uint8)
    if executor is not None and concurrent > 1:
        list(executor.map(model.infer, [largest] * concurrent))
    else:
        model.infer(largest)
    model.infer(largest[:1])


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
            "task": c.task, "endpoint": f"/{TASKS[c.task].endpoint}", "precision": c.precision, "labels": c.labels,
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
        # Up to inference_threads batches run at once (each on ort_threads cores), shared by all models.
        self.executor = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="ort")
        self.models: dict[str, dict[str, ServedModel]] = {}
        self.ready = False
        for entry in discover(settings.model_root):
            try:
                model = OnnxModel.load(entry.path, entry.name, entry.version, settings.device, settings.ort_threads)
            except InvalidModel as exc:
                raise RepositoryError(f"{entry.path}: invalid model: {exc}") from None
            wanted = settings.max_batch_for(model.providers)
            fixed = model.contract.batch.max_size
            batcher = DynamicBatcher(
                model.infer, self.executor,
                max_batch=min(wanted, fixed) if fixed else wanted,
                max_wait_ms=settings.batch_wait_ms, max_queue=settings.max_queue * settings.max_images,
                on_batch=(lambda n, s, ref=entry.ref: on_batch(ref, n, s)) if on_batch else None,
                concurrency=settings.inference_threads,
            )
            self.models.setdefault(entry.name, {})[entry.version] = ServedModel(model, batcher)
            log.info("loaded %s (%s) from %s on %s", entry.ref, model.contract.task, entry.path, model.providers)

    def warm_up(self) -> None:
        """:func:`warm_up` every model, its largest batch on every inference thread at once."""
        for versions in self.models.values():
            for served in versions.values():
                warm_up(served.model, served.batcher.max_batch, self.settings.inference_threads, self.executor)
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
