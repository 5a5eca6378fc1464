"""The model repository on disk: ``<root>/<name>/<version>/model.onnx`` (Triton's layout).

Pure filesystem: which models exist and how versions order. The highest version (numeric
when versions are numbers) is a name's default. Loading and serving them is service/'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import RepositoryError

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


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
            path = vdir / MODEL_FILE
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
