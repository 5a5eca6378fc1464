"""A schema-driven fuzzer (schemathesis) over the live /docs.json: every operation the
document describes, with generated and mutated requests, answers no 5xx and no status the
document does not list for it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow


def test_no_generated_request_gets_a_5xx_or_an_undocumented_status(server, tmp_path) -> None:
    exe = shutil.which("schemathesis")
    assert exe, "schemathesis is in the dev extra"
    r = subprocess.run([exe, "run", f"{server.url}/docs.json", "--checks", "not_a_server_error,status_code_conformance",
                        "--max-examples", "15", "--workers", "1", "--seed", "20261201", "--request-timeout", "60",
                        "--suppress-health-check", "all", "--no-color"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its .schemathesis/ cache
    summary = r.stdout[-3000:]
    assert r.returncode == 0, summary
    counts = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 100, summary
