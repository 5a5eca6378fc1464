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
  Clients see its path relative to the model root and what is wrong in convserve's words
  (:class:`Refused`); the server path and ONNX Runtime's own text go to the log only.

Requests name ``name`` or ``name:version``; without a version the highest one answers,
without a name the first model (by name) that can serve the endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ContractError, DeviceUnavailable, InvalidModel, ModelNotFound, RepositoryError, WrongTask
from core.repository import ModelEntry, discover, scan, version_key
from core.runtime import OnnxModel, cuda_driver_present
from service import placement as placements
from service.batch_cost import default_target
from service.batching import DynamicBatcher, WorkerRuns
from service.endpoints import ENDPOINTS, TASK_ENDPOINTS, Endpoint
from service.placement import Placement, Profile
from service.settings import Settings

log = logging.getLogger("convserve.repository")
FileId = tuple[int, int, int]  # inode, size, mtime (ns) of a model.onnx


def on_cpu(settings: Settings) -> bool:
    """Whether models will run on the CPU (no CUDA asked for, or none to be had)."""
    return settings.device == "cpu" or (settings.device == "auto" and not cuda_driver_present())


def measured(settings: Settings) -> bool:
    """Whether placements are measured (service.placement) rather than set or moot."""
    return settings.placement == "auto" and settings.ort_threads > 1 and on_cpu(settings)


def check_repository(settings: Settings) -> tuple[list[ModelEntry], dict[str, Profile]]:
    """Check the repository as a worker will load it: every model.onnx opens in ONNX Runtime
    (on CPU) with a contract that agrees with its graph; an explicit CUDA request can really
    be met. Raises RepositoryError naming the file. Also measures each model for its
    placement when that is measured (service.placement), keyed by placement.file_key."""
    found = discover(settings.model_root, settings.model_name)
    profiles: dict[str, Profile] = {}
    for entry in found:
        model = open_model(entry, "cpu", 1)
        batch = settings.max_batch_for(model.providers)
        checked_warm_up(model, batch)
        if measured(settings):
            profiles[placements.file_key(entry.path)] = placements.measure(entry.path, settings.ort_threads, batch,
                                                                           narrow=model)
    if settings.device == "cuda":
        from core.runtime import create_session

        try:
            create_session(found[0].path, "cuda", 1)
        except DeviceUnavailable as exc:
            raise RepositoryError(str(exc)) from None
    return found, profiles


class Refused(RepositoryError):
    """A model file that cannot be served. Its message (for the log and the start-up check's
    one line) names the file's full path and carries ONNX Runtime's own text; ``reason`` is what
    clients see (/models, /admin/reload, /v2/repository/index): convserve's words, no server
    path, no ONNX Runtime internals."""

    def __init__(self, path: Path, detail: str, reason: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.reason = path, reason


LOG_ONLY = " (the server log has details)"


def reason_for(exc: BaseException) -> str:
    """What clients are told about a file refused with ``exc``: contract errors are already
    convserve's words (they name the contract field); anything else is summed up."""
    if isinstance(exc, Refused):
        return exc.reason
    if isinstance(exc, ContractError):
        return f"invalid model: {exc}"
    if isinstance(exc, InvalidModel):
        return "invalid model: ONNX Runtime could not load the graph" + LOG_ONLY
    if isinstance(exc, DeviceUnavailable):
        return "the device CONVSERVE_DEVICE asks for is not available for this model" + LOG_ONLY
    return "the model could not be loaded" + LOG_ONLY


def open_model(entry: ModelEntry, device: str, threads: int, lone_threads: int | None = None) -> OnnxModel:
    """``entry``'s file in ONNX Runtime, its contract checked; :class:`Refused` naming the file."""
    try:
        return OnnxModel.load(entry.path, entry.name, entry.version, device, threads, lone_threads)
    except InvalidModel as exc:
        raise Refused(entry.path, f"invalid model: {exc}", reason_for(exc)) from None


def checked_warm_up(model: OnnxModel, max_batch: int) -> None:
    """:func:`warm_up` one run at a time; :class:`Refused` naming the file when the graph fails
    (whatever it raises: the worker's warm-up would too) or answers with a class count other
    than the contract's."""
    try:
        warm_up(model, max_batch, 1)
    except ContractError as exc:
        raise Refused(model.path, f"invalid model: {exc}", reason_for(exc)) from None
    except Exception as exc:
        raise Refused(model.path, f"the model fails on a warm-up batch: {exc}",
                      "the model fails on a warm-up batch" + LOG_ONLY) from None


def warm_up(model: OnnxModel, max_batch: int, concurrent: int, executor: ThreadPoolExecutor | None = None) -> None:
    """Run ``model`` as hard as serving will: its largest batch ``concurrent`` times at once,
    then one image. ONNX Runtime's memory then holds what serving needs, and neither first
    requests nor new batch sizes pay set-up time or grow it much. ContractError when the
    one image's answer has another class count than the contract's labels."""
    i = model.contract.input
    largest = np.full((min(max_batch, model.contract.batch.max_size or max_batch), i.height, i.width, i.channels),
                      i.pad_value, np.uint8)
    if executor is not None and concurrent > 1:
        list(executor.map(model.infer, [largest] * concurrent))
    else:
        model.infer(largest)
    model.check_answer(model.infer(largest[:1])[0])  # graphs that leave the class count symbolic
    if model.lone_session is not None:
        model.infer(largest[:1], lone=True)


def batch_costs(model: OnnxModel, max_batch: int) -> dict[int, float]:
    """Seconds of one image and of the largest batch on the batch session, after warm-up
    (the median of three runs for one image, one run of the batch): BatchCost's seed."""
    i = model.contract.input
    largest = np.full((min(max_batch, model.contract.batch.max_size or max_batch), i.height, i.width, i.channels),
                      i.pad_value, np.uint8)
    costs = {}
    for images, reps in ((largest[:1], 3), (largest, 1)):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model.infer(images)
            times.append(time.perf_counter() - t)
        costs[len(images)] = sorted(times)[len(times) // 2]
    return costs


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
    placement: Placement
    file: FileId | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def ref(self) -> str:
        return f"{self.model.name}:{self.model.version}"

    def describe(self, default: bool) -> dict[str, Any]:
        c = self.model.contract
        endpoints = [f"/{e.name}" for e in ENDPOINTS.values() if e.serves(c)]
        return {
            "name": self.model.name, "version": self.model.version, "default_version": default,
            "task": c.task, "endpoint": f"/{TASK_ENDPOINTS[c.task].name}", "endpoints": endpoints,
            "precision": c.precision, "labels": c.labels,
            "input": {"height": c.input.height, "width": c.input.width, "channels": c.input.channels,
                      "color": c.input.color, "resize": c.input.resize, "dtype": c.input.dtype,
                      "layout": c.input.layout},
            "outputs": {k: v for k, v in (("embedding", c.outputs.embedding), ("cam", c.outputs.cam)) if v},
            **({"keypoints": dataclasses.asdict(c.keypoints)} if c.keypoints else {}),
            **({"embedding": dataclasses.asdict(c.embedding)} if c.embedding else {}),
            "batch": {"dynamic": c.batch.dynamic, "size": c.batch.size, "max_batch": self.batcher.max_batch,
                      "target_ms": round(self.batcher.target_s * 1e3, 1) if self.batcher.target_s else None,
                      "limit_now": self.batcher.batch_limit()},
            "placement": self.placement.describe(),
            "providers": self.model.providers,
            "provenance": {k: v for k, v in c.provenance.items()
                           if k in ("architecture", "dataset", "metrics", "exported_at")},
        }


@dataclass
class ReloadReport:
    """What one :meth:`ModelRepository.reload` changed."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # path relative to the model root -> why

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "replaced": self.replaced, "removed": self.removed, "refused": self.refused}

    def __bool__(self) -> bool:
        return bool(self.added or self.replaced or self.removed or self.refused)


class ModelRepository:
    """All served models of one worker, plus the inference threads they share."""

    def __init__(self, settings: Settings, on_batch: Callable[[str, int, float], None] | None = None,
                 on_dropped: Callable[[str, int], None] | None = None) -> None:
        self.settings, self.on_batch, self.on_dropped = settings, on_batch, on_dropped
        # Up to inference_threads batches at once (on how many threads: service.placement), for all models.
        self.executor = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="ort")
        self.runs = WorkerRuns()
        self.profiles = placements.load_profiles() if measured(settings) else {}
        self.models: dict[str, dict[str, ServedModel]] = {}
        # refused files: path relative to the model root -> (why, in convserve's words; the file refused)
        self.errors: dict[str, tuple[str, FileId | None]] = {}
        self.ready = False
        self._reload_lock: asyncio.Lock | None = None
        for entry in discover(settings.model_root, settings.model_name):
            self.models.setdefault(entry.name, {})[entry.version] = self._load(entry, file_id(entry.path))

    def _load(self, entry: ModelEntry, ident: FileId | None) -> ServedModel:
        """Open ``entry`` (whose file is ``ident``) with its batcher, not yet warmed up;
        RepositoryError naming the file."""
        s = self.settings
        place = self.placement_of(entry)
        model = open_model(entry, s.device, place.session_threads, place.lone_threads)
        wanted = s.max_batch_for(model.providers)
        fixed = model.contract.batch.max_size
        on_batch, on_dropped = self.on_batch, self.on_dropped
        batcher = DynamicBatcher(
            model.infer, self.executor,
            max_batch=min(wanted, fixed) if fixed else wanted,
            max_wait_ms=s.batch_wait_ms, max_pending_images=s.max_requests * s.max_images,
            on_batch=(lambda n, sec, ref=entry.ref: on_batch(ref, n, sec)) if on_batch else None,
            concurrency=min(place.runs, s.inference_threads), worker=self.runs, threads=place.session_threads,
            on_dropped=(lambda n, ref=entry.ref: on_dropped(ref, n)) if on_dropped else None,
        )
        log.info("loaded %s (%s) from %s on %s; %s: %s", entry.ref, model.contract.task, entry.path, model.providers,
                 place.mode, place.reason)
        return ServedModel(model, batcher, place, ident)

    def placement_of(self, entry: ModelEntry) -> Placement:
        """How ``entry`` uses the worker's cores: CONVSERVE_PLACEMENT, or measured
        (service.placement; by the start-up check, or now in a child process)."""
        s = self.settings
        if not on_cpu(s):
            return placements.fixed("narrow", s.inference_threads, "a GPU runs it: intra-op threads do not matter")
        if s.placement != "auto":
            return placements.fixed(s.placement, s.ort_threads, "CONVSERVE_PLACEMENT")
        if s.ort_threads <= 1:
            return placements.fixed("narrow", 1, "one core per worker")
        key = placements.file_key(entry.path)
        profile = self.profiles.get(key)
        if profile is None or profile.threads != s.ort_threads:
            try:
                profile = placements.measure_in_child(entry.path, s.ort_threads, s.max_batch or 8)
            except Exception as exc:  # a file that cannot be run: opening it says why, in our words
                log.info("%s could not be measured (%s); one thread a run", entry.ref, exc)
                return placements.fixed("narrow", s.ort_threads, "could not be measured")
            self.profiles[key] = profile
        return placements.choose(profile, s.lone_session_mb)

    def seed_costs(self, served: ServedModel) -> None:
        """Measure the batch session (:func:`batch_costs`) into the batcher's cost and set its
        time target (CONVSERVE_BATCH_TARGET_MS, or service.batch_cost.default_target)."""
        costs = batch_costs(served.model, served.batcher.max_batch)
        for size, seconds in costs.items():
            served.batcher.cost.observe(size, seconds)
        t = self.settings.batch_target_ms
        served.batcher.target_s = t / 1e3 if t else default_target(costs[1])

    def warm_up_all(self) -> None:
        """:func:`warm_up` every model, its largest batch on every inference thread at once."""
        for versions in self.models.values():
            for served in versions.values():
                warm_up(served.model, served.batcher.max_batch, served.batcher.concurrency, self.executor)
                self.seed_costs(served)
        self.ready = True

    # --- serving ----------------------------------------------------------------------

    def model_for(self, endpoint: Endpoint, ref: str | None) -> ServedModel:
        """The model a request to ``endpoint`` names (``name`` or ``name:version``; empty: the
        first model by name that serves the endpoint). ModelNotFound or WrongTask."""
        models = self.models  # one snapshot: a reload swaps the dict, it never edits it in place
        if not ref:
            contracts = {n: vs[_highest(vs)].model.contract for n, vs in models.items()}
            # the endpoint's own task first (/embed: embedding models before classifiers' features), then by name
            candidates = sorted((endpoint.tasks.index(c.task), n) for n, c in contracts.items() if endpoint.serves(c))
            if not candidates:
                raise ModelNotFound(f"no model that serves /{endpoint.name} is loaded")
            ref = candidates[0][1]
        name, _, version = ref.partition(":")
        served = self.lookup(name, version or None, models)
        c = served.model.contract
        if c.task not in endpoint.tasks:
            raise WrongTask(f"model {served.ref} is a {c.task} model, not {' or '.join(endpoint.tasks)}; "
                            f"use /{TASK_ENDPOINTS[c.task].name}")
        if not endpoint.serves(c):
            raise WrongTask(f"model {served.ref} has no {', '.join(endpoint.requires)} output, so it cannot serve "
                            f"/{endpoint.name} (export it with --{endpoint.requires[0]})")
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
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: "
                                f"{sorted(versions, key=version_key)}")
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
            entries, problems = await loop.run_in_executor(None, scan, self.settings.model_root,
                                                           self.settings.model_name)
        except RepositoryError as exc:
            log.error("model repository not reloaded: %s", exc)
            report.refused["."] = ("the model repository cannot be read as it stands (what is served stays): "
                                   + str(exc).replace(str(self.settings.model_root), "CONVSERVE_MODEL_ROOT"))
            return report
        on_disk = {(e.name, e.version): e for e in entries}
        current = self.models
        models = {name: dict(versions) for name, versions in current.items()}
        for (name, version), entry in on_disk.items():
            ident = file_id(entry.path)
            loaded = current.get(name, {}).get(version)
            if loaded is not None and loaded.file == ident:
                continue
            key = self._relative(entry.path)
            if key in self.errors and self.errors[key][1] == ident:
                continue  # refused before, unchanged since
            try:
                served = await loop.run_in_executor(None, self._load_and_warm, entry, ident)
            except Exception as exc:
                detail = str(exc) if isinstance(exc, Refused) else f"{entry.path}: {exc}"
                log.error("refused %s: %s; %s", entry.ref, detail,
                          "the loaded version keeps serving" if loaded else "it is not served")
                self.errors[key] = (reason_for(exc), ident)
                report.refused[key] = reason_for(exc)
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
        gone = [p for p in self.errors if not (self.settings.model_root / p).is_file()]
        for path in gone:
            del self.errors[path]
        for path, problem in problems:
            self.errors.setdefault(self._relative(path), (problem, None))
        self.models = models  # one assignment: a request sees the old set or the new one
        return report

    def _relative(self, path: Path) -> str:
        """``path`` as clients see it: relative to the model root ("name/version/model.onnx")."""
        try:
            return path.relative_to(self.settings.model_root).as_posix()
        except ValueError:  # not under the root (cannot happen for scanned files): never show it whole
            return path.name

    def _load_and_warm(self, entry: ModelEntry, ident: FileId | None) -> ServedModel:
        served = self._load(entry, ident)
        checked_warm_up(served.model, served.batcher.max_batch)
        self.seed_costs(served)
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
        """The files a reload refused (or version folders without a model), with why: paths
        relative to the model root, reasons in convserve's words (:class:`Refused`)."""
        return [{"path": path, "error": why} for path, (why, _) in self.errors.items()]


