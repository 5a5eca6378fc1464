"""Files written by generators, compared as a whole."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> str:
    """SHA-256 of every file under ``root``: its relative path and its bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
