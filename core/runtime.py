"""ONNX Runtime sessions and the model they serve.

Provider choice tells the truth: ``auto`` tries CUDA and keeps it only if the session
really got CUDAExecutionProvider (onnxruntime-gpu on a machine without CUDA silently falls
back to CPU); ``cuda`` fails loudly when CUDA cannot be had; ``cpu`` never tries.

:class:`OnnxModel` runs batches of uint8 images and hands back one output dict per image,
whatever the graph's batch: dynamic graphs run the batch as it is, fixed-batch graphs run
it in chunks of their size (the last one padded), and outputs without a batch axis (a fixed
batch of 1 may leave it out) are split by core.tasks. A model may hold a second session of
the same file with more intra-op threads for a lone image (``infer(..., lone=True)``;
service.placement says when that pays).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from core.contract import METADATA_KEY, ModelContract
from core.errors import DeviceUnavailable, InvalidModel
from core.onnx_contract import check_classes, checked_contract
from core.tasks import TASKS, Outputs

log = logging.getLogger("convserve.runtime")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


_arena_lock = threading.Lock()
_arena_registered = False


def share_cpu_arena() -> None:
    """Register one CPU memory arena for every session of this process (idempotent).

    By default each session grows its own arena to the peak of its own runs, so a process
    serving three models holds three peaks. Sessions created by :func:`session_options`
    draw from this one instead: measured with the three shipped models, 45 MB less after
    warm-up and 60 MB less after batches of every size. The arena is thread-safe."""
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 0}))
            _arena_registered = True


def session_options(threads: int) -> ort.SessionOptions:
    """``threads`` intra-op threads that sleep when idle instead of spinning (a spinning pool
    keeps cores busy between runs and takes them from decoding and HTTP), and the process's
    shared CPU arena (:func:`share_cpu_arena`)."""
    share_cpu_arena()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is loadable here. Without one, ``auto`` does not even try CUDA:
    the attempt loads ONNX Runtime's CUDA provider library (about 185 MB resident) for nothing."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def create_session(path: Path | str, device: str = "auto", threads: int = 1) -> ort.InferenceSession:
    """An InferenceSession on the providers ``device`` asks for; see the module docstring."""
    so = session_options(threads)
    if device == "auto" and not cuda_driver_present():
        return ort.InferenceSession(str(path), so, providers=[CPU])
    if device in ("auto", "cuda") and CUDA in ort.get_available_providers():
        _preload_cuda_libraries()
        if device == "auto":
            ort.set_default_logger_severity(4)  # a failed CUDA load is expected here, not an error
        try:
            sess = ort.InferenceSession(str(path), so, providers=[CUDA, CPU])
        finally:
            ort.set_default_logger_severity(2)  # back to ONNX Runtime's default (warnings)
        if CUDA in sess.get_providers():
            return sess
        if device == "cuda":
            raise DeviceUnavailable(f"CONVSERVE_DEVICE=cuda but CUDA did not initialise for {path}; "
                                    "check the NVIDIA driver and CUDA 13/cuDNN 9 libraries")
        log.info("CUDA is not usable here; %s runs on CPU", path)
        return sess
    if device == "cuda":
        raise DeviceUnavailable("CONVSERVE_DEVICE=cuda but this onnxruntime build has no CUDAExecutionProvider")
    return ort.InferenceSession(str(path), so, providers=[CPU])


_preloaded = False


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries pip installed (onnxruntime-gpu[cuda,cudnn]), once.

    Without torch in the process nothing else puts them on the loader's path. Failure is
    not an error here: the session creation that follows tells whether CUDA works.
    """
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # pragma: no cover - depends on the machine
        log.info("could not preload CUDA libraries: %s", exc)


def _open(path: Path, device: str, threads: int) -> ort.InferenceSession:
    """:func:`create_session`, with ONNX Runtime's own errors as InvalidModel."""
    try:
        return create_session(path, device, threads)
    except DeviceUnavailable:
        raise
    except Exception as exc:  # ONNX Runtime's own errors: not ONNX, unsupported op, ...
        raise InvalidModel(f"ONNX Runtime cannot load it: {exc}") from None


def _io(args: list[Any]) -> list[tuple[str, str, list[Any]]]:
    return [(a.name, a.type, list(a.shape)) for a in args]


@dataclass
class OnnxModel:
    """One served model: its session, contract and where it came from."""

    name: str
    version: str
    path: Path
    contract: ModelContract
    session: ort.InferenceSession
    threads: int = 1  # intra-op threads of ``session``
    lone_session: ort.InferenceSession | None = None  # more threads, for a lone image on an idle worker
    lone_threads: int = 1

    @classmethod
    def load(cls, path: Path, name: str, version: str, device: str = "auto", threads: int = 1,
             lone_threads: int | None = None) -> OnnxModel:
        """Open ``path`` on ``threads`` intra-op threads and validate its contract against the
        graph (core.onnx_contract.checked_contract: bounds, inputs, outputs, class counts
        declared); with ``lone_threads``, a second session on that many threads for lone images.

        Raises InvalidModel (ContractError for the contract) or DeviceUnavailable."""
        session = _open(path, device, threads)
        meta = session.get_modelmeta().custom_metadata_map
        contract = checked_contract(meta.get(METADATA_KEY), _io(session.get_inputs()), _io(session.get_outputs()))
        model = cls(name, version, path, contract, session, threads)
        if lone_threads is not None and lone_threads != threads:
            model.lone_session, model.lone_threads = _open(path, device, lone_threads), lone_threads
        return model

    def check_answer(self, outputs: Outputs) -> None:
        """ContractError unless one image's ``outputs`` (from :meth:`infer`) have as many
        classes as the contract has labels: the check for graphs that leave the class
        dimension symbolic, which :meth:`load` cannot make."""
        check_classes(self.contract, {k: v.shape for k, v in outputs.items()}, "a run's")

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def output_names(self) -> list[str]:
        return self.contract.outputs.tensor_names()

    def _uses_lone(self, lone: bool) -> bool:
        return lone and self.lone_session is not None

    def threads_for(self, lone: bool) -> int:
        """The intra-op threads :meth:`infer` runs on."""
        return self.lone_threads if self._uses_lone(lone) else self.threads

    def run(self, batch: np.ndarray, lone: bool = False) -> Outputs:
        """Run one graph call on a uint8 [N, H, W, 3] batch (on the lone session when ``lone``
        and there is one); the contract's outputs by name."""
        names = self.output_names
        session = self.lone_session if self._uses_lone(lone) else self.session
        values = session.run(names, {self.contract.input.name: batch})
        return dict(zip(names, values))

    def infer(self, images: np.ndarray, lone: bool = False) -> list[Outputs]:
        """Run any number of uint8 [H, W, 3] images; one output dict per image, in order."""
        c = self.contract
        task = TASKS[c.task]
        size = c.batch.max_size
        if size is None:
            return task.split(self.run(images, lone), len(images), c.outputs)
        per_image: list[Outputs] = []
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            n = len(chunk)
            if n < size:  # a fixed-batch graph takes exactly `size` images: pad with zeros
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
            per_image += task.split(self.run(chunk, lone), n, c.outputs)
        return per_image
