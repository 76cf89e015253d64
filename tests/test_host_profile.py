"""The measured host profile: quick mode validates with plausible numbers, round-trips through
TOML, and `load_profile("host")` measures once, then reads the cached file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpareto.device_profiles import loader
from llmpareto.device_profiles.schema import PROFILE_FIELDS, DeviceProfile, profile_from_dict
from llmpareto.evaluators import host


@pytest.fixture(scope="module")
def quick_profile() -> DeviceProfile:
    return host.measure_host_profile(quick=True)


def test_quick_profile_validates_and_is_plausible(quick_profile: DeviceProfile) -> None:
    p = profile_from_dict(quick_profile.to_dict(), "host")
    assert p == quick_profile
    assert 1e8 < p.bandwidth_Bps < 1e13
    assert 0 < p.eta_mem <= 1 and 0 < p.eta_compute <= 1
    assert p.peak_flops["f32"] > 1e8
    assert set(p.peak_flops) <= {"f32", "bf16", "f16"}
    assert p.memory_bytes > 2**28
    assert p.overhead_s_per_token >= 0 and p.overhead_s_per_layer >= 0
    # a per-token decode step of eager transformers costs more than nothing and less than 1 s
    assert 0 < p.overhead_s_per_token + 4 * p.overhead_s_per_layer < 1.0
    assert p.fast_formats == () and p.sparse == ()
    assert p.runtime.startswith("torch ") and "threads" in p.runtime
    for key, source in p.sources.items():
        assert source.startswith("derived: "), key
    measured = ("bandwidth_Bps", "eta_mem", "eta_compute", "overhead_s_per_layer",
                "peak_flops.f32")
    assert all("measured" in p.sources[k] for k in measured)


def test_toml_round_trip(quick_profile: DeviceProfile, tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text(loader.dump_toml(quick_profile))
    back = loader.read_toml(path)
    assert back == quick_profile
    assert {f: getattr(back, f) for f in PROFILE_FIELDS} == \
        {f: getattr(quick_profile, f) for f in PROFILE_FIELDS}


def test_load_host_measures_once_then_reuses_cache(quick_profile: DeviceProfile, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_measure(runtime: str = "torch", quick: bool = False) -> DeviceProfile:
        calls.append((runtime, quick))
        return quick_profile

    cache = tmp_path / "cache" / "host.toml"
    monkeypatch.setenv("LLMPARETO_HOST_PROFILE", str(cache))
    monkeypatch.setattr(host, "measure_host_profile", fake_measure)
    first = loader.load_profile("host")
    assert calls == [("torch", False)] and cache.is_file()
    mtime = cache.stat().st_mtime_ns
    second = loader.load_profile("host")
    assert calls == [("torch", False)], "the cached host profile should be reused"
    assert cache.stat().st_mtime_ns == mtime
    assert first == second == quick_profile


def test_unknown_runtime_is_a_user_error() -> None:
    from llmpareto.errors import UserError

    with pytest.raises(UserError, match="runtime 'llama.cpp'"):
        host.measure_host_profile(runtime="llama.cpp")


def test_overhead_line_fit_is_exact_and_never_negative() -> None:
    slope, intercept = host._line([1, 2, 4, 8], [0.3 + 0.2 * n for n in (1, 2, 4, 8)])
    assert slope == pytest.approx(0.2) and intercept == pytest.approx(0.3)
    assert host._line([1, 8], [0.5, 0.1]) == (0.0, pytest.approx(0.3))  # falling: no slope
    slope, intercept = host._line([1, 8], [0.05, 1.6])  # negative intercept: through origin
    assert intercept == 0.0 and slope > 0


def test_llamacpp_runtime_calibration_is_fitted_from_gguf_models():
    from llmpareto.evaluators.host import measure_host_profile

    p = measure_host_profile(runtime="llamacpp", quick=True)
    assert p.runtime.startswith("llama.cpp")
    assert set(p.fast_formats) == {"f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "tq2_0"}
    assert 0 < p.eta_mem <= 1 and 0 < p.eta_compute <= 1
    assert "every GGUF format" in p.sources["eta_mem"]
    # one decode-kernel rate per format, each with its source, and the cost model uses them
    assert set(p.kernel_weights_per_s) == set(p.fast_formats)
    assert all(f"kernel_weights_per_s.{f}" in p.sources for f in p.kernel_weights_per_s)
