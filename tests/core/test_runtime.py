"""ONNX Runtime sessions: the shared CPU arena keeps answers exact when models run at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.repository import discover
from core.runtime import OnnxModel, session_options

ROOT = Path(__file__).resolve().parents[2]


def test_sessions_share_one_arena_and_concurrent_runs_stay_exact() -> None:
    assert session_options(1).get_session_config_entry("session.use_env_allocators") == "1"
    models = [OnnxModel.load(e.path, e.name, e.version, "cpu", 1) for e in discover(ROOT / "models")]
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (n, m.contract.input.height, m.contract.input.width, 3), dtype=np.uint8)
              for m in models for n in (1, 3, 8)]
    owners = [m for m in models for _ in (1, 3, 8)]
    alone = [m.infer(x) for m, x in zip(owners, inputs)]
    with ThreadPoolExecutor(4) as pool:  # every model, every size, four at a time, twice over
        together = list(pool.map(lambda mx: mx[0].infer(mx[1]), list(zip(owners, inputs)) * 2))
    for expected, got in zip(alone * 2, together):
        for a, b in zip(expected, got):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
