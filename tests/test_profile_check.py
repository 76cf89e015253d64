"""Profiles carry measurements (fit and held-out) and are checked against them; shapes of
public models; timing GGUFs of any shape that llama.cpp loads."""

import dataclasses
import tomllib

import numpy as np
import pytest

from llmpareto.cli import main
from llmpareto.device_profiles import load_profile, profile_dir
from llmpareto.device_profiles.schema import Measurement, profile_from_dict
from llmpareto.errors import UserError
from llmpareto.evaluators.profile_check import (
    check_rows,
    fit_bandwidth_and_overhead,
    predicted_tokens_per_s,
    refit,
    summary,
)
from llmpareto.shapes import KNOWN_SHAPES, Shape, known_shape

ROW = {"model": "llama-2-7b", "format": "q4_0", "test": "tg128", "tokens_per_s": 20.0,
       "role": "fit", "date": "2025-01-01", "source": "https://example.org/bench"}


def _pi5(**extra) -> dict:
    data = tomllib.loads((profile_dir() / "raspberry-pi-5.toml").read_text())
    data.update(extra)
    return data


def test_schema_reads_measurements_and_their_context():
    p = profile_from_dict(_pi5(measurements=[ROW, {**ROW, "test": "decode@256",
                                                   "role": "held-out"}]))
    assert [m.context for m in p.measurements] == [64, 256]  # tg128: mean KV of 0..128
    assert p.measurements[0] == Measurement(**ROW)


def test_schema_reads_a_llama_cpp_preset_row():
    p = profile_from_dict(_pi5(measurements=[{**ROW, "format": "Q4_K_M"}]))
    assert p.measurements[0].format == "Q4_K_M"


@pytest.mark.parametrize("bad, match", [
    ({"model": "gpt-5"}, "model 'gpt-5'"), ({"format": "q3_k"}, "format 'q3_k'"),
    ({"format": "Q4_K_XL"}, "Q4_K_M"),
    ({"test": "pp512"}, "test 'pp512'"), ({"role": "train"}, "role 'train'"),
    ({"tokens_per_s": -1.0}, "tokens_per_s"), ({"source": ""}, "'source'"),
    ({"extra": 1}, "unknown field"),
])
def test_schema_refuses_a_bad_measurement_naming_it(bad, match):
    with pytest.raises(UserError, match=match) as err:
        profile_from_dict(_pi5(measurements=[ROW, {**ROW, **bad}]), "pi.toml")
    assert "pi.toml" in str(err.value) and "measurements[1]" in str(err.value)


def test_every_measurement_of_a_shipped_profile_is_sourced_and_predicted():
    seen = 0
    for name in [p.stem for p in profile_dir().glob("*.toml")]:
        p = load_profile(name)
        for row in check_rows(p):
            assert row["source"].startswith(("http", "measured:")), row
            assert np.isfinite(row["predicted_tokens_per_s"]) and row["predicted_tokens_per_s"] > 0
            seen += 1
    assert seen >= 40  # h100-sxm's measured rows, rtx-4090's published ones, ...


@pytest.mark.parametrize("intercept", ["token", "layer"])
def test_the_two_number_fit_recovers_a_known_profile(intercept):
    per_token, per_layer = (0.002, 0.0) if intercept == "token" else (0.0, 6e-5)
    truth = dataclasses.replace(load_profile("rtx-4090"), eta_mem=0.7, kernel_weights_per_s={},
                                overhead_s_per_token=per_token, overhead_s_per_layer=per_layer,
                                measurements=())
    rows = tuple(Measurement(m, f, "tg128", 1.0, "fit", "x", "https://x")
                 for m, f in (("llama-2-7b", "q8_0"), ("llama-2-13b", "f16"),
                              ("qwen2.5-3b", "q4_0"), ("llama-3-8b", "Q4_K_M"),
                              ("smollm2-135m", "Q8_0")))
    rows = tuple(dataclasses.replace(r, tokens_per_s=predicted_tokens_per_s(truth, r))
                 for r in rows)
    given = dataclasses.replace(truth, measurements=rows)
    eta, overhead, resid = fit_bandwidth_and_overhead(given, intercept)
    assert eta == pytest.approx(0.7, rel=1e-6)
    assert overhead == pytest.approx(per_token or per_layer, rel=1e-6) and resid < 1e-6
    new = refit(dataclasses.replace(given, eta_mem=0.5, overhead_s_per_token=0.01), intercept)
    assert (new.eta_mem, new.overhead_s_per_token, new.overhead_s_per_layer) == pytest.approx(
        (0.7, per_token, per_layer), rel=1e-6, abs=1e-12)
    assert "role 'fit'" in new.sources["eta_mem"]
    s = summary(check_rows(new))
    assert s["fit"]["rows"] == 5 and s["fit"]["mape_%"] < 1e-4 and "held-out" not in s


def test_a_preset_row_is_predicted_from_llama_cpp_mix_not_uniform():
    """A published "Q4_0" file has a q6_K head: slower than a uniform q4_0 file."""
    p = load_profile("rtx-4090")
    row = Measurement("llama-2-7b", "Q4_0", "tg128", 1.0, "fit", "x", "https://x")
    uniform = dataclasses.replace(row, format="q4_0")
    assert predicted_tokens_per_s(p, row) < predicted_tokens_per_s(p, uniform) * 0.995


def test_refit_command_writes_a_profile_that_loads(tmp_path, capsys):
    out = tmp_path / "pi.toml"
    assert main(["devices", "raspberry-pi-5", "--refit", "layer", "--out", str(out)]) == 0
    got = load_profile(str(out))
    assert got.overhead_s_per_layer > 0 and got.overhead_s_per_token == 0
    assert len(got.measurements) == len(load_profile("raspberry-pi-5").measurements)
    assert "before:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["devices", "apple-a17-pro", "--refit", "token"], "fit rows"),
    (["devices", "--refit", "token"], "need a profile"),
    (["devices", "apple-m2", "--out", "x.toml"], "add --refit"),
])
def test_refit_bad_input(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_devices_shows_predicted_vs_measured_for_fit_and_held_out(capsys):
    assert main(["devices", "h100-sxm"]) == 0
    out = capsys.readouterr().out
    assert "predicted vs measured decode" in out
    assert "fit: 24 rows" in out and "held-out: 30 rows" in out and "measured:" in out


def test_a_shape_is_the_arch_transformers_builds_from_that_config():
    from transformers import LlamaConfig

    from llmpareto.arch import Arch

    shape = known_shape("smollm2-135m")
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                      tie_word_embeddings=True)
    ref = Arch.from_config(cfg)
    ours = shape.arch()
    assert ours.n_params == ref.n_params == 134_515_008
    assert [(t.fqn, t.rows, t.cols) for t in ours.linears] == \
        [(t.fqn, t.rows, t.cols) for t in ref.linears]
    assert (ours.n_kv_heads, ours.head_dim, ours.lm_head) == (ref.n_kv_heads, ref.head_dim, None)
    assert set(KNOWN_SHAPES) >= {"llama-2-7b", "tinyllama-1.1b", "llama-3.2-1b", "smollm2-135m"}


def test_a_timing_gguf_has_the_shape_and_formats_and_runs_in_llama_cpp(tmp_path):
    import gguf

    from llmpareto.evaluators.llamacpp import gguf_speeds
    from llmpareto.evaluators.timing_gguf import write_timing_gguf
    from llmpareto.recipe import Recipe

    shape = Shape(256, 512, 2, 4, 2, 3000)
    arch = shape.arch()
    recipe = Recipe({"re:.*mlp.*": {"format": "q4_0"}, "_default": {"format": "q8_0"}})
    path = write_timing_gguf(tmp_path / "t.gguf", shape, arch.formats_for(recipe))
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_k.weight"] == "Q8_0"
    assert types["output.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert len(reader.tensors) == 2 * 9 + 3
    assert reader.fields["llama.vocab_size"].contents() == 3000
    m = gguf_speeds([str(path)], prompt_tokens=16, decode_tokens=4, contexts=(32,), rounds=1,
                    threads=1)[0]
    assert m["measured_latency_ms"] > 0 and m["measured_prompt_tokens_per_s"] > 0


def test_profile_host_gpu_flags_are_checked(capsys):
    assert main(["profile-host", "--gpu"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["profile-host", "--runtime", "llamacpp", "--gpu", "--base", "h100-sxm",
                 "--threads", "2"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_gpu_bench_report_summarizes_a_csv_and_sets_cpu_fallbacks_apart(tmp_path, capsys):
    from llmpareto.bench.bench_gpu_profile import report

    csv = tmp_path / "g.csv"
    csv.write_text("group,case,no_gpu_kernel_tensors,measured_ms,predicted_ms,"
                   "shipped_predicted_ms\n"
                   "front point,trial 1,0,1.0,1.1,4.0\nfront point,trial 2,0,2.0,2.1,4.1\n"
                   "front point,trial 3,0,3.0,2.9,4.2\nfront point,trial 6,5,30.0,1.0,4.0\n")
    report(csv)
    out = capsys.readouterr().out
    assert "left out of the summary: trial 6" in out
    assert "front point (3 files) at KV 256: calibrated Spearman 1.000" in out
