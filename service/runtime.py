"""ONNX Runtime sessions: provider choice that tells the truth, and thread settings.

``auto`` tries CUDA and keeps it only if the session really got CUDAExecutionProvider
(onnxruntime-gpu on a machine without CUDA silently falls back to CPU); ``cuda`` fails
loudly when CUDA cannot be had; ``cpu`` never tries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.contract import METADATA_KEY, ContractError, ModelContract, check_io

log = logging.getLogger("convserve.runtime")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceUnavailable(RuntimeError):
    """An explicit ``cuda`` request could not be met."""


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def create_session(path: Path | str, device: str = "auto", threads: int = 1) -> ort.InferenceSession:
    """An InferenceSession on the providers ``device`` asks for; see the module docstring."""
    so = session_options(threads)
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

    @classmethod
    def load(cls, path: Path, name: str, version: str, device: str = "auto", threads: int = 1) -> "OnnxModel":
        """Open ``path`` and validate its contract against the graph (ContractError if not)."""
        session = create_session(path, device, threads)
        meta = session.get_modelmeta().custom_metadata_map
        contract = ModelContract.from_json(meta.get(METADATA_KEY))
        check_io(contract, _io(session.get_inputs()), _io(session.get_outputs()))
        return cls(name, version, path, contract, session)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def output_names(self) -> list[str]:
        return self.contract.outputs.tensor_names()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a uint8 [N, H, W, 3] batch; returns the contract's outputs by name."""
        names = self.output_names
        values = self.session.run(names, {self.contract.input.name: batch})
        return dict(zip(names, values))


__all__ = ["OnnxModel", "create_session", "DeviceUnavailable", "ContractError"]
