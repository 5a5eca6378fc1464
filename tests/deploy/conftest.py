"""The Docker engine and the convserve image, shared by the deploy tests (session-scoped: the
image is built once for test_container.py and test_fleet.py).

Needs a Docker engine: ../shared/tools/container-engine starts one here (and the base image a
Bento's Dockerfile needs). Where none can be had the tests that use these fixtures skip and
say why.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.commands import run as _run

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT.parent / "shared" / "tools" / "container-engine"
IMAGE = "convserve:test"


@pytest.fixture(scope="session")
def engine() -> None:
    if not ENGINE.is_file():
        pytest.skip(f"no container engine helper at {ENGINE}")
    r = subprocess.run([str(ENGINE)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    if r.returncode != 0:
        pytest.skip(f"no Docker engine could be started: {(r.stdout + r.stderr).strip().splitlines()[-1:]}")
    os.environ["DOCKER_HOST"] = "unix:///var/run/docker.sock"


@pytest.fixture(scope="session")
def image(engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """bentoml build + bentoml containerize, in a private BENTOML_HOME."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {"BENTOML_HOME": str(home), "DOCKER_BUILDKIT": "0", "BENTOML_DO_NOT_TRACK": "true"}
    out = _run(["bentoml", "build", "--output", "tag"], env=env).stdout.strip().splitlines()[-1]
    tag = out.removeprefix("__tag__:")
    _run(["bentoml", "containerize", tag, "--backend", "docker", "-t", IMAGE], env=env)
    return IMAGE
