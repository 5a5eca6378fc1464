"""The model repository on disk: ``<root>/<name>/<version>/model.onnx`` (Triton's layout).

The one place that spells the layout (:func:`model_path`, :func:`parse_model_path`), lists
what a repository holds and how versions order (the highest version, numeric when versions
are numbers, is a name's default), and puts a new model version into it (:func:`publish`:
contract in the metadata, then one atomic rename). Loading and serving models is service/'s
job. Importing this module loads no onnx, NumPy or Pillow (the service's supervising process
imports it); :func:`publish` loads onnx when called.

:func:`scan` also reads a folder that holds one model, as KServe's storage initializer lays
out ``/mnt/models`` (see :func:`scan`): a single ``*.onnx`` file, or ``<version>/model.onnx``
folders; the caller names that model (the service passes CONVSERVE_MODEL_NAME).
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
SINGLE_VERSION = "1"  # the version of a model given as one file


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


def _is_model_file(path: Path) -> bool:
    return path.suffix.lower() == ".onnx" and not path.name.startswith(".") and path.is_file()


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _holds_models(folder: Path) -> bool:
    """Whether ``folder`` holds a model.onnx itself or in one of its (visible) folders."""
    return (folder / MODEL_FILE).is_file() or any((d / MODEL_FILE).is_file() for d in _visible_dirs(folder))


def single_model_name(root: Path, file: Path | None = None, name: str | None = None) -> str:
    """The name of the one model a single-model folder (or file) ``root`` holds: ``name`` (the
    service passes CONVSERVE_MODEL_NAME, which KServe's runtime sets to the InferenceService's
    name), else the file's stem (``resnet.onnx`` -> ``resnet``), else the folder's own name
    (Triton names a model by its folder)."""
    if name:
        return name
    if file is not None and file.stem != Path(MODEL_FILE).stem:
        return file.stem
    return (root if root.is_dir() else root.parent).resolve().name or "model"


def scan(root: Path, name: str | None = None) -> tuple[list[ModelEntry], list[tuple[Path, str]]]:
    """Every model under ``root`` (sorted by name, then version) and the problems found
    (version folders without a model.onnx, model files out of place). Names starting with
    "." are skipped, so a new version can be written to a ``.staging`` folder and renamed into
    place. ``root`` is read in one of three layouts, told apart by what it holds:

    1. **a repository** (convserve's own, and Triton's): ``<root>/<name>/<version>/model.onnx``,
       any number of models and versions;
    2. **one model, one file**: ``root`` is a ``*.onnx`` file, or a folder holding exactly one
       ``*.onnx`` file at its top (KServe's storage initializer puts a storageUri that is one
       object, ``gs://bucket/path/resnet.onnx``, at ``/mnt/models/resnet.onnx``; a PVC or a
       folder given to ``CONVSERVE_MODEL_ROOT`` may hold ``model.onnx`` alone): version "1";
    3. **one model, version folders**: ``<root>/<version>/model.onnx`` with numeric versions
       (Triton's folder of one model; KServe copies a storageUri that is a folder as it
       stands, and mounts a ``pvc://`` one there directly).

    The one model of layouts 2 and 3 is named ``name``, else as :func:`single_model_name`
    says. A folder that mixes them (an ``*.onnx`` file at its top beside folders holding
    models, several ``*.onnx`` files at its top, version folders beside model folders) raises
    RepositoryError naming what it found: guessing could serve the wrong models, and a reload
    that raises leaves what is served as it is. So does a root that is
    neither a directory nor an ``*.onnx`` file."""
    if root.is_file() and root.suffix.lower() == ".onnx":
        return [ModelEntry(single_model_name(root, root, name), SINGLE_VERSION, root)], []
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    files = sorted(p for p in root.iterdir() if _is_model_file(p))
    dirs = _visible_dirs(root)
    if files:
        if len(files) > 1:
            raise RepositoryError(f"model repository {root} holds {len(files)} .onnx files at its top "
                                  f"({', '.join(p.name for p in files)}): a folder of one model holds one; "
                                  f"several models are laid out <name>/<version>/{MODEL_FILE}")
        mixed = [d.name for d in dirs if _holds_models(d)]
        if mixed:
            raise RepositoryError(f"model repository {root} holds {files[0].name} at its top and model folders "
                                  f"({', '.join(mixed)}): serve either one model file or <name>/<version>/{MODEL_FILE}")
        return [ModelEntry(single_model_name(root, files[0], name), SINGLE_VERSION, files[0])], []
    versions = [d for d in dirs if d.name.isdigit() and (d / MODEL_FILE).is_file()]
    if versions:
        mixed = [d.name for d in dirs if not d.name.isdigit() and _holds_models(d)]
        if mixed:
            listed = ", ".join(v.name for v in versions)
            raise RepositoryError(f"model repository {root} holds version folders ({listed}/{MODEL_FILE}) beside "
                                  f"model folders ({', '.join(mixed)}): lay out either <version>/{MODEL_FILE} "
                                  f"(one model) or <name>/<version>/{MODEL_FILE}")
        model = single_model_name(root, None, name)
        found, problems = [], []
        for vdir in sorted((d for d in dirs if d.name.isdigit()), key=lambda v: version_key(v.name)):
            path = vdir / MODEL_FILE
            if path.is_file():
                found.append(ModelEntry(model, vdir.name, path))
            else:
                problems.append((path, f"missing (every <version>/ folder holds a {MODEL_FILE})"))
        return found, problems
    found, problems = [], []
    for name_dir in dirs:
        if (name_dir / MODEL_FILE).is_file():
            problems.append((name_dir / MODEL_FILE, f"not in a version folder (lay it out as "
                                                    f"{name_dir.name}/1/{MODEL_FILE})"))
        for vdir in sorted(_visible_dirs(name_dir), key=lambda v: version_key(v.name)):
            path = model_path(root, name_dir.name, vdir.name)
            if not path.is_file():
                problems.append((path, f"missing (every <name>/<version>/ folder holds a {MODEL_FILE})"))
                continue
            found.append(ModelEntry(name_dir.name, vdir.name, path))
    return found, problems


def discover(root: Path, name: str | None = None) -> list[ModelEntry]:
    """Every model under ``root`` (:func:`scan`'s layouts), sorted by name then version;
    RepositoryError naming the path when the root is missing, empty or mixes layouts, or a
    version folder holds no model.onnx."""
    found, problems = scan(root, name)
    if problems:
        path, problem = problems[0]
        raise RepositoryError(f"{path}: {problem}")
    if not found:
        raise RepositoryError(f"model repository {root} holds no <name>/<version>/{MODEL_FILE} "
                              f"(nor one *.onnx file, nor <version>/{MODEL_FILE} folders of one model)")
    return found
