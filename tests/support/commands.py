"""Running a command from the repository root, as the container and fleet tests do."""

from __future__ import annotations

import os
import subprocess

from tests.support.servers import ROOT


def run(cmd: list[str], timeout: float = 1800, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` in the checkout with ``env`` added; AssertionError with its output tails when
    it fails and ``check``."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r
