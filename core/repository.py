"""The model repository on disk: ``<root>/<name>/<version>/model.onnx`` (Triton's layout).

The one place that spells the layout (:func:`model_path`, :func:`parse_model_path`), lists
what a repository holds and how versions order (the highest version, numeric when versions
are numbers, is a name's default), and puts a new model version into it (:func:`publish`:
contract in the metadata, then one atomic rename). Loading and serving models is service/'s
job. Importing this module loads no onnx, NumPy or Pillow (the service's supervising process
imports it); :func:`publish` loads onnx when called.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import RepositoryError

if TYPE_CHECKING:
    import onnx

    from core.contract import ModelContract

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def model_path(root: Path, name: str, version: str) -> Path:
    """The file of version ``version`` of model ``name`` in the repository at ``root``."""
    return root / name / version / MODEL_FILE


def parse_model_path(path: Path) -> tuple[Path, str, str]:
    """(root, name, version) of a file laid out as :func:`model_path` lays it out. The folders
    are read as they stand: a file outside a repository gets the names of the folders above it."""
    return path.parent.parent.parent, path.parent.parent.name, path.parent.name


def publish(model: onnx.ModelProto, contract: ModelContract, root: Path, name: str, version: str,
            check: Callable[[Path], None] | None = None) -> Path:
    """Put ``model``, carrying ``contract``, into the repository at ``root`` as ``name``
    version ``version``; returns its path (:func:`model_path`).

    The contract becomes the model's metadata and is checked against the graph
    (core.onnx_contract.set_contract, which also runs onnx.checker). The bytes go to a hidden
    file in the version's folder, which ``check`` (if given) may inspect and refuse by
    raising, and then take the final name in one ``os.replace``: a reader sees the previous
    file or the new one, never part of one. On any error the hidden file is removed."""
    from core.onnx_contract import set_contract  # onnx: loaded only by processes that write models

    data = set_contract(model, contract).SerializeToString()
    out = model_path(root, name, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        staged.write_bytes(data)
        if check is not None:
            check(staged)
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return out


def version_key(version: str) -> tuple[int, Any]:
    """Sort key: numeric versions by value, before any non-numeric ones (by name)."""
    return (0, int(version)) if version.isdigit() else (1, version)


def scan(root: Path) -> tuple[list[ModelEntry], list[tuple[Path, str]]]:
    """Every model under ``root`` (sorted by name, then version) and the problems found: version
    folders without a model.onnx. Names starting with "." are skipped, so a new version can be
    written to ``<name>/.staging`` and renamed into place. RepositoryError when the root is not
    a directory."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    found, problems = [], []
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = [v for v in name_dir.iterdir() if v.is_dir() and not v.name.startswith(".")]
        for vdir in sorted(versions, key=lambda v: version_key(v.name)):
            path = model_path(root, name_dir.name, vdir.name)
            if not path.is_file():
                problems.append((path, f"missing (every <name>/<version>/ folder holds a {MODEL_FILE})"))
                continue
            found.append(ModelEntry(name_dir.name, vdir.name, path))
    return found, problems


def discover(root: Path) -> list[ModelEntry]:
    """Every model under ``root``, sorted by name then version; RepositoryError naming the path
    when the root is missing or empty, or a version folder holds no model.onnx."""
    found, problems = scan(root)
    if problems:
        path, problem = problems[0]
        raise RepositoryError(f"{path}: {problem}")
    if not found:
        raise RepositoryError(f"model repository {root} holds no <name>/<version>/{MODEL_FILE}")
    return found
