"""The model repository: ``<root>/<name>/<version>/model.onnx`` (Triton's layout).

Every model found is opened, its contract validated against its graph, warmed up and
given a dynamic batcher. Anything broken stops start-up with a message naming the file.
The highest version (numeric when all versions are numbers) is a name's default;
requests name ``name`` or ``name:version``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from service.batching import DynamicBatcher
from service.contract import ContractError
from service.errors import InvalidParameter, UnknownModel
from service.runtime import OnnxModel
from service.settings import Settings

log = logging.getLogger("convserve.repository")


class RepositoryError(RuntimeError):
    """The model repository cannot be served; the message names the path."""


def _version_key(v: str) -> tuple[int, Any]:
    return (0, int(v)) if v.isdigit() else (1, v)


def discover(root: Path) -> list[tuple[str, str, Path]]:
    """(name, version, path) for every model.onnx under root, sorted by name then version."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    found = []
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = [v for v in name_dir.iterdir() if v.is_dir() and not v.name.startswith(".")]
        for vdir in sorted(versions, key=lambda v: _version_key(v.name)):
            path = vdir / "model.onnx"
            if not path.is_file():
                raise RepositoryError(f"{path}: missing (every <name>/<version>/ folder holds a model.onnx)")
            found.append((name_dir.name, vdir.name, path))
    if not found:
        raise RepositoryError(f"model repository {root} holds no <name>/<version>/model.onnx")
    return found


def preflight(settings: Settings) -> list[tuple[str, str, Path]]:
    """Check the repository without creating sessions: every model.onnx parses and its
    contract agrees with its graph; an explicit CUDA request can really be met.
    Raises RepositoryError naming the file."""
    from service.onnx_meta import read_contract

    found = discover(settings.model_root)
    for _, _, path in found:
        try:
            read_contract(path)
        except ContractError as exc:
            raise RepositoryError(f"{path}: invalid model: {exc}") from None
    if settings.device == "cuda":
        from service.runtime import DeviceUnavailable, create_session

        try:
            create_session(found[0][2], "cuda", 1)
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
            "task": c.task, "labels": c.labels,
            "input": {"height": c.input.height, "width": c.input.width, "resize": c.input.resize,
                      "dtype": c.input.dtype, "layout": c.input.layout},
            "batch": {"dynamic": c.batch.dynamic, "max_batch": self.batcher.max_batch},
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
        for name, version, path in discover(settings.model_root):
            try:
                model = OnnxModel.load(path, name, version, settings.device, settings.ort_threads)
            except ContractError as exc:
                raise RepositoryError(f"{path}: invalid model contract: {exc}") from None
            except Exception as exc:
                raise RepositoryError(f"{path}: cannot be loaded by ONNX Runtime: {exc}") from exc
            fixed = model.contract.batch.max_size
            ref = f"{name}:{version}"
            batcher = DynamicBatcher(
                model.run, self.executor,
                max_batch=min(settings.max_batch, fixed) if fixed else settings.max_batch,
                max_wait_ms=settings.batch_wait_ms, max_queue=settings.max_queue,
                batch_axis_outputs=model.contract.batch.dynamic,
                on_batch=(lambda n, s, ref=ref: on_batch(ref, n, s)) if on_batch else None,
            )
            self.models.setdefault(name, {})[version] = ServedModel(model, batcher)
            log.info("loaded %s (%s) from %s on %s", ref, model.contract.task, path, model.providers)

    def warm_up(self) -> None:
        """Run every model once at its largest batch so first requests pay no set-up cost."""
        for versions in self.models.values():
            for served in versions.values():
                c = served.model.contract
                n = served.batcher.max_batch
                served.model.run(np.full((n, c.input.height, c.input.width, 3), 114, np.uint8))
                if n > 1:
                    served.model.run(np.full((1, c.input.height, c.input.width, 3), 114, np.uint8))
        self.ready = True

    def default_version(self, name: str) -> str:
        return max(self.models[name], key=_version_key)

    def resolve(self, ref: str | None, task: str) -> ServedModel:
        """Find the model a request names (``name`` or ``name:version``; empty: the only one
        of this task, or the first by name). Raises UnknownModel / InvalidParameter."""
        if not ref:
            candidates = sorted(n for n, vs in self.models.items()
                                if vs[self.default_version(n)].model.contract.task == task)
            if not candidates:
                raise UnknownModel(f"no {task} model is loaded")
            ref = candidates[0]
        name, _, version = ref.partition(":")
        if name not in self.models:
            raise UnknownModel(f"unknown model {name!r}; loaded: {sorted(self.models)}")
        version = version or self.default_version(name)
        if version not in self.models[name]:
            raise UnknownModel(f"model {name!r} has no version {version!r}; versions: {sorted(self.models[name])}")
        served = self.models[name][version]
        if served.model.contract.task != task:
            raise InvalidParameter(f"model {name}:{version} is a {served.model.contract.task} model, "
                                   f"not {task}; use /{_ENDPOINT[served.model.contract.task]}")
        return served

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.models):
            default = self.default_version(name)
            for version, served in sorted(self.models[name].items(), key=lambda kv: _version_key(kv[0])):
                out.append(served.describe(version == default))
        return out


_ENDPOINT = {"classification": "classify", "detection": "detect", "segmentation": "segment"}
