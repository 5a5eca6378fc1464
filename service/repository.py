"""The models one worker serves: each loaded, checked, warmed up and given a batcher; and
the model repository watched while serving.

Built from the repository on disk (core.repository). At start-up anything broken stops the
worker with a message naming the file. While serving, :meth:`ModelRepository.reload` (run
every CONVSERVE_POLL_S seconds by :meth:`ModelRepository.watch`, and on POST /admin/reload)
compares the disk with what is loaded:

- a new ``<name>/<version>/model.onnx`` (write it elsewhere and rename its folder into
  place) is loaded, checked and warmed up off the event loop, then becomes servable, and
  the default when it is the highest version;
- a replaced file (another inode, size or mtime) is loaded the same way and swapped in;
- a removed version stops being offered at once; requests that already hold it finish;
- a file that cannot be served is refused with a log line naming it and listed in
  :attr:`ModelRepository.errors` (/models shows them); what was serving goes on serving.

Requests name ``name`` or ``name:version``; without a version the highest one answers,
without a name the first model (by name) that can serve the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from core.errors import DeviceUnavailable, InvalidModel, ModelNotFound, RepositoryError, WrongTask
from core.repository import ModelEntry, discover, scan, version_key
from core.runtime import OnnxModel
from core.tasks import ENDPOINTS, TASKS
from service.batching import DynamicBatcher
from service.settings import Settings

if TYPE_CHECKING:
    from core.tasks import Task

log = logging.getLogger("convserve.repository")
FileId = tuple[int, int, int]  # inode, size, mtime (ns) of a model.onnx


def check_repository(settings: Settings) -> list[ModelEntry]:
    """Check the repository as a worker will load it: every model.onnx opens in ONNX Runtime
    (on CPU) with a contract that agrees with its graph; an explicit CUDA request can really
    be met. Raises RepositoryError naming the file."""
    found = discover(settings.model_root)
    for entry in found:
        model = open_model(entry, "cpu", 1)
        checked_warm_up(model, settings.max_batch_for(model.providers))
    if settings.device == "cuda":
        from core.runtime import create_session

        try:
            create_session(found[0].path, "cuda", 1)
        except DeviceUnavailable as exc:
            raise RepositoryError(str(exc)) from None
    return found


def open_model(entry: ModelEntry, device: str, threads: int) -> OnnxModel:
    """``entry``'s file in ONNX Runtime, its contract checked; RepositoryError naming the file."""
    try:
        return OnnxModel.load(entry.path, entry.name, entry.version, device, threads)
    except InvalidModel as exc:
        raise RepositoryError(f"{entry.path}: invalid model: {exc}") from None


def checked_warm_up(model: OnnxModel, max_batch: int) -> None:
    """:func:`warm_up` one run at a time; RepositoryError naming the file when the graph fails
    (whatever it raises: the worker's warm-up would too)."""
    try:
        warm_up(model, max_batch, 1)
    except Exception as exc:
        raise RepositoryError(f"{model.path}: the model fails on a warm-up batch: {exc}") from None


def warm_up(model: OnnxModel, max_batch: int, concurrent: int, executor: ThreadPoolExecutor | None = None) -> None:
    """Run ``model`` as hard as serving will: its largest batch ``concurrent`` times at once,
    then one image. ONNX Runtime's memory then holds what serving needs, and neither first
    requests nor new batch sizes pay set-up time or grow it much."""
    i = model.contract.input
    largest = np.full((min(max_batch, model.contract.batch.max_size or max_batch), i.height, i.width, i.channels),
                      i.pad_value, np.uint8)
    if executor is not None and concurrent > 1:
        list(executor.map(model.infer, [largest] * concurrent))
    else:
        model.infer(largest)
    model.infer(largest[:1])


def _highest(versions: dict[str, Any]) -> str:
    """A name's default version: the highest (core.repository.version_key)."""
    return max(versions, key=version_key)


def file_id(path: Path) -> FileId | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ServedModel:
    model: OnnxModel
    batcher: DynamicBatcher
    file: FileId | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def ref(self) -> str:
        return f"{self.model.name}:{self.model.version}"

    def describe(self, default: bool) -> dict[str, Any]:
        c = self.model.contract
        endpoints = [f"/{e.endpoint}" for e in ENDPOINTS.values() if e.serves(c)]
        return {
            "name": self.model.name, "version": self.model.version, "default_version": default,
            "task": c.task, "endpoint": f"/{TASKS[c.task].endpoint}", "endpoints": endpoints,
            "precision": c.precision, "labels": c.labels,
            "input": {"height": c.input.height, "width": c.input.width, "channels": c.input.channels,
                      "color": c.input.color, "resize": c.input.resize, "dtype": c.input.dtype,
                      "layout": c.input.layout},
            "outputs": {k: v for k, v in (("embedding", c.outputs.embedding), ("cam", c.outputs.cam)) if v},
            "batch": {"dynamic": c.batch.dynamic, "size": c.batch.size, "max_batch": self.batcher.max_batch},
            "providers": self.model.providers,
            "provenance": {k: v for k, v in c.provenance.items() if k in ("architecture", "dataset", "metrics", "exported_at")},
        }


@dataclass
class ReloadReport:
    """What one :meth:`ModelRepository.reload` changed."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # path -> why

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "replaced": self.replaced, "removed": self.removed, "refused": self.refused}

    def __bool__(self) -> bool:
        return bool(self.added or self.replaced or self.removed or self.refused)


class ModelRepository:
    """All served models of one worker, plus the inference threads they share."""

    def __init__(self, settings: Settings, on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.settings, self.on_batch = settings, on_batch
        # Up to inference_threads batches run at once (each on ort_threads cores), shared by all models.
        self.executor = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="ort")
        self.models: dict[str, dict[str, ServedModel]] = {}
        self.errors: dict[str, tuple[str, FileId | None]] = {}  # path -> (why, the file refused) of refused files
        self.ready = False
        self._reload_lock: asyncio.Lock | None = None
        for entry in discover(settings.model_root):
            self.models.setdefault(entry.name, {})[entry.version] = self._load(entry, file_id(entry.path))

    def _load(self, entry: ModelEntry, ident: FileId | None) -> ServedModel:
        """Open ``entry`` (whose file is ``ident``) with its batcher, not yet warmed up;
        RepositoryError naming the file."""
        s = self.settings
        model = open_model(entry, s.device, s.ort_threads)
        wanted = s.max_batch_for(model.providers)
        fixed = model.contract.batch.max_size
        on_batch = self.on_batch
        batcher = DynamicBatcher(
            model.infer, self.executor,
            max_batch=min(wanted, fixed) if fixed else wanted,
            max_wait_ms=s.batch_wait_ms, max_queue=s.max_queue * s.max_images,
            on_batch=(lambda n, sec, ref=entry.ref: on_batch(ref, n, sec)) if on_batch else None,
            concurrency=s.inference_threads,
        )
        log.info("loaded %s (%s) from %s on %s", entry.ref, model.contract.task, entry.path, model.providers)
        return ServedModel(model, batcher, ident)

    def warm_up(self) -> None:
        """:func:`warm_up` every model, its largest batch on every inference thread at once."""
        for versions in self.models.values():
            for served in versions.values():
                warm_up(served.model, served.batcher.max_batch, self.settings.inference_threads, self.executor)
        self.ready = True

    # --- serving ----------------------------------------------------------------------


    def resolve(self, ref: str | None, task: "Task") -> ServedModel:
        """The model a request to ``task``'s endpoint names (``name`` or ``name:version``; empty:
        the first model by name that serves the endpoint). ModelNotFound or WrongTask."""
        models = self.models  # one snapshot: a reload swaps the dict, it never edits it in place
        if not ref:
            candidates = sorted(n for n, vs in models.items() if task.serves(vs[_highest(vs)].model.contract))
            if not candidates:
                raise ModelNotFound(f"no model that serves /{task.endpoint} is loaded")
            ref = candidates[0]
        name, _, version = ref.partition(":")
        served = self.lookup(name, version or None, models)
        c = served.model.contract
        if c.task != task.name:
            raise WrongTask(f"model {served.ref} is a {c.task} model, not {task.name}; use /{TASKS[c.task].endpoint}")
        if not task.serves(c):
            raise WrongTask(f"model {served.ref} has no {', '.join(task.requires)} output, so it cannot serve "
                            f"/{task.endpoint} (export it with --{task.requires[0]})")
        return served

    def lookup(self, name: str, version: str | None = None,
               models: dict[str, dict[str, ServedModel]] | None = None) -> ServedModel:
        """The model ``name`` (its default version, or ``version``), whatever its task, from
        ``models`` (default: the ones served now); ModelNotFound."""
        models = self.models if models is None else models
        if name not in models:
            raise ModelNotFound(f"unknown model {name!r}; loaded: {sorted(models)}")
        versions = models[name]
        version = version or _highest(versions)
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {sorted(versions, key=version_key)}")
        return versions[version]

    def describe(self) -> list[dict[str, Any]]:
        out = []
        models = self.models
        for name in sorted(models):
            default = _highest(models[name])
            for version, served in sorted(models[name].items(), key=lambda kv: version_key(kv[0])):
                out.append(served.describe(version == default))
        return out

    # --- watching the repository ----------------------------------------------------------

    async def reload(self) -> ReloadReport:
        """Bring the served models in line with the disk (see the module docstring)."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> ReloadReport:
        loop = asyncio.get_running_loop()
        report = ReloadReport()
        try:
            entries, problems = await loop.run_in_executor(None, scan, self.settings.model_root)
        except RepositoryError as exc:
            log.error("model repository not reloaded: %s", exc)
            report.refused[str(self.settings.model_root)] = str(exc)
            return report
        on_disk = {(e.name, e.version): e for e in entries}
        current = self.models
        models = {name: dict(versions) for name, versions in current.items()}
        for (name, version), entry in on_disk.items():
            ident = file_id(entry.path)
            loaded = current.get(name, {}).get(version)
            if loaded is not None and loaded.file == ident:
                continue
            key = str(entry.path)
            if key in self.errors and self.errors[key][1] == ident:
                continue  # refused before, unchanged since
            try:
                served = await loop.run_in_executor(None, self._load_and_warm, entry, ident)
            except Exception as exc:
                message = str(exc) if isinstance(exc, RepositoryError) else f"{entry.path}: {exc}"
                log.error("refused %s: %s; %s", entry.ref, message,
                          "the loaded version keeps serving" if loaded else "it is not served")
                self.errors[key] = (message, ident)
                report.refused[key] = message
                continue
            self.errors.pop(key, None)
            models.setdefault(name, {})[version] = served
            (report.replaced if loaded else report.added).append(entry.ref)
            log.info("%s %s from %s", "replaced" if loaded else "added", entry.ref, entry.path)
        for name, versions in current.items():
            for version in versions:
                if (name, version) not in on_disk:
                    del models[name][version]
                    report.removed.append(f"{name}:{version}")
                    log.info("removed %s:%s: no longer in the repository (requests holding it finish)", name, version)
            if not models[name]:
                del models[name]
        gone = [p for p in self.errors if not Path(p).is_file()]
        for path in gone:
            del self.errors[path]
        for path, problem in problems:
            self.errors.setdefault(str(path), (f"{path}: {problem}", None))
        self.models = models  # one assignment: a request sees the old set or the new one
        return report

    def _load_and_warm(self, entry: ModelEntry, ident: FileId | None) -> ServedModel:
        served = self._load(entry, ident)
        checked_warm_up(served.model, served.batcher.max_batch)
        return served

    async def watch(self, interval_s: float) -> None:
        """Reload every ``interval_s`` seconds, for ever (a task of the worker's event loop)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload()
            except Exception:  # never let the watcher die: the next poll tries again
                log.exception("reloading the model repository failed")

    def refused(self) -> list[dict[str, Any]]:
        """The files a reload refused (or version folders without a model), with why."""
        return [{"path": path, "error": why} for path, (why, _) in self.errors.items()]


