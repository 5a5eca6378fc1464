"""service.placement: how a model uses the worker's cores, chosen from measured costs; and the
defaults the core count decides (service.settings.machine_defaults), with the count injected."""

import pytest

from core.repository import discover
from core.runtime import OnnxModel
from service import placement, settings
from service.placement import Placement, Profile, choose
from service.settings import Settings, machine_defaults
from tests.support.servers import SHIPPED_MODELS


def _profile(narrow_one: float, wide_one: float, narrow_batch: float | None = None,
             wide_batch: float | None = None, wide_mb: float = 0.0) -> Profile:
    return Profile(threads=2, batch=8, narrow_one=narrow_one, wide_one=wide_one, narrow_batch=narrow_batch,
                   wide_batch=wide_batch, wide_mb=wide_mb)


# Measured on the 2-core machine (README "Heavy models").
RESNET18 = _profile(0.0338, 0.0174, 0.257, 0.128, wide_mb=85.5)
MOBILENET = _profile(0.0066, 0.0074)


@pytest.mark.parametrize("profile, budget, mode", [
    (RESNET18, 128, "both"),     # a lone image 1.9x faster on two threads; its second session fits the budget
    (RESNET18, 0, "wide"),       # no second session allowed: its batches split well (1.0), so one wide session
    (MOBILENET, 128, "narrow"),  # a lone image gains nothing from a second thread
    (_profile(0.0074, 0.0052, 0.054, 0.038, wide_mb=300), 128, "narrow"),  # over budget, batches split poorly
])
def test_the_mode_follows_the_measured_costs(profile: Profile, budget: float, mode: str) -> None:
    chosen = choose(profile, budget)
    assert chosen.mode == mode
    assert f"{profile.narrow_one * 1e3:.1f} ms on 1 thread" in chosen.reason  # the reason says what was measured


def test_each_mode_sets_threads_and_runs() -> None:
    assert (Placement("narrow", 4, "").session_threads, Placement("narrow", 4, "").runs) == (1, 4)
    wide = Placement("wide", 4, "")
    assert (wide.session_threads, wide.lone_threads, wide.runs) == (4, None, 1)
    both = Placement("both", 4, "")
    assert (both.session_threads, both.lone_threads, both.runs) == (1, 4, 4)
    assert placement.fixed("wide", 1, "setting").mode == "narrow"  # one core: nothing to spread


def test_a_lone_session_really_has_more_intra_op_threads() -> None:
    """Observed through ONNX Runtime: the session a lone image runs on, and the batches'."""
    entry = discover(SHIPPED_MODELS)[0]
    model = OnnxModel.load(entry.path, entry.name, entry.version, "cpu", 1, lone_threads=2)
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert model.lone_session.get_session_options().intra_op_num_threads == 2
    assert (model.threads_for(True), model.threads_for(False)) == (2, 1)
    i = model.contract.input
    import numpy as np
    x = np.full((1, i.height, i.width, i.channels), 128, np.uint8)
    lone, batched = model.infer(x, lone=True)[0], model.infer(x)[0]
    for name in lone:  # the same graph and weights: the same answer
        np.testing.assert_allclose(lone[name], batched[name], rtol=1e-4, atol=1e-4)


def test_measuring_a_shipped_model_in_a_child_process(tmp_path) -> None:
    entry = discover(SHIPPED_MODELS)[0]
    profile = placement.measure_in_child(entry.path, 2, 4)
    assert profile.threads == 2 and profile.batch == 4 and 0 < profile.narrow_one < 1 and 0 < profile.wide_one < 1
    assert choose(profile).mode in placement.MODES
    path = tmp_path / "profiles.json"
    placement.save_profiles({placement.file_key(entry.path): profile}, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(placement.ENV, str(path))
        assert placement.load_profiles() == {placement.file_key(entry.path): profile}
        mp.setenv(placement.ENV, str(tmp_path / "missing.json"))
        assert placement.load_profiles() == {}


@pytest.mark.parametrize("cores, workers, per_worker", [(1, 1, 1), (2, 1, 2), (16, 4, 4), (6, 2, 3)])
def test_defaults_from_the_core_count(cores: int, workers: int, per_worker: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = machine_defaults(cores)
    assert (defaults.workers, defaults.cores_per_worker) == (workers, per_worker)
    assert f"{cores} core(s)" in defaults.reason
    monkeypatch.setattr(settings, "available_cores", lambda: cores)
    for name in ("CONVSERVE_WORKERS", "CONVSERVE_INFERENCE_THREADS", "CONVSERVE_ORT_THREADS",
                 "CONVSERVE_DECODE_THREADS", "CONVSERVE_PLACEMENT"):
        monkeypatch.delenv(name, raising=False)
    s = Settings.from_env()
    assert (s.workers, s.inference_threads, s.ort_threads, s.decode_threads) == (workers, *[per_worker] * 3)
    assert s.placement == "auto"


def test_every_default_can_be_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "available_cores", lambda: 16)
    monkeypatch.setenv("CONVSERVE_WORKERS", "2")
    monkeypatch.setenv("CONVSERVE_ORT_THREADS", "6")
    monkeypatch.setenv("CONVSERVE_PLACEMENT", "wide")
    monkeypatch.setenv("CONVSERVE_BATCH_TARGET_MS", "40")
    s = Settings.from_env()
    assert (s.workers, s.inference_threads, s.ort_threads, s.placement, s.batch_target_ms) == (2, 8, 6, "wide", 40)
    monkeypatch.setenv("CONVSERVE_PLACEMENT", "sideways")
    with pytest.raises(Exception, match="CONVSERVE_PLACEMENT"):
        Settings.from_env()
