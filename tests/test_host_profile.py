"""The measured host profile: quick mode validates with plausible numbers, round-trips through
TOML, and `load_profile("host")` measures once, then reads the cached file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpareto.device_profiles import loader
from llmpareto.device_profiles.schema import PROFILE_FIELDS, DeviceProfile, profile_from_dict
from llmpareto.evaluators import host
from llmpareto.formats import GGUF_FORMATS


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
    first = host.load_device("host")
    assert calls == [("torch", False)] and cache.is_file()
    mtime = cache.stat().st_mtime_ns
    second = loader.load_profile("host")  # cached: read, never measured
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


def test_llamacpp_runtime_calibration_is_fitted_from_gguf_models(tiny_model_dir):
    from llmpareto.evaluators.host import measure_host_profile
    from llmpareto.evaluators.host_llamacpp import shapes_like
    from llmpareto.models import load_arch

    like = load_arch(str(tiny_model_dir))
    p = measure_host_profile(runtime="llamacpp", quick=True, threads=1, like=like)
    # random models with the tiny model's block shapes were among the calibration models
    shape = shapes_like(like, (2e6,), max_blocks=4)[0]
    assert shape[0] == like.hidden_size and shape[3:] == (like.n_kv_heads, like.head_dim)
    assert str(shape) in p.sources["eta_mem"]
    assert p.runtime.startswith("llama.cpp") and p.runtime.endswith(", 1 threads")
    # llama.cpp's CPU backend runs every GGUF type; the 32-weight ones (and tq2_0) are timed
    assert set(p.fast_formats) == set(GGUF_FORMATS)
    assert 0 < p.eta_mem <= 1 and 0 < p.eta_compute <= 1
    assert "every GGUF format" in p.sources["eta_mem"]
    # one decode-kernel rate per format, each with its source, and the cost model uses them
    assert set(p.kernel_weights_per_s) == {"f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "tq2_0"}
    assert all(f"kernel_weights_per_s.{f}" in p.sources for f in p.kernel_weights_per_s)
    assert p.attention_values_per_s > 0 and "attention rate" in p.sources["attention_values_per_s"]


def test_llamacpp_fit_recovers_known_rates_and_overheads():
    from llmpareto.arch import Arch, Tensor2D
    from llmpareto.evaluators.host_llamacpp import _features, _fit

    def arch(layers: int, width: int) -> Arch:
        lin = [Tensor2D(f"model.layers.{i}.mlp.proj", width, 3 * width, i, "mlp.proj")
               for i in range(layers)]
        return Arch(linears=lin, embedding=Tensor2D("model.embed_tokens", 256, width, None,
                                                    "embed"),
                    lm_head=None, other_params=0, n_layers=layers, n_kv_heads=width // 64,
                    head_dim=64, hidden_size=width, vocab_size=256, n_heads=width // 64)

    true = {"q4_0": 1 / 30e9, "q8_0": 1 / 20e9}
    per_layer, per_value, per_token = 20e-6, 1 / 3e9, 50e-6
    rows = []
    for a in (arch(48, 384), arch(12, 768), arch(8, 1024)):
        for fmt, s in true.items():
            formats = {t.fqn: fmt for t in [*a.linears, a.embedding]}
            for context in (160, 512):
                x = _features(a, formats, context, sorted(true))
                t = x[0] * s if fmt == "q4_0" else x[1] * s
                t += per_layer * a.n_layers + per_value * x[-2] + per_token
                rows.append({"arch": a, "formats": formats, "context": context, "seconds": t})
    fit = _fit(rows)
    for fmt, s in true.items():
        assert fit.seconds_per_weight[fmt] == pytest.approx(s, rel=1e-6)
    assert fit.per_layer_s == pytest.approx(per_layer, rel=1e-6)
    assert fit.per_attention_value_s == pytest.approx(per_value, rel=1e-6)
    assert fit.per_token_s == pytest.approx(per_token, rel=1e-6)
    assert fit.residual_pct < 1e-6
