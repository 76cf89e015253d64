"""Device profiles: every shipped one validates; every bad one is refused by name and field."""

import json
import tomllib

import pytest

from llmpareto.cli import main
from llmpareto.device_profiles import dump_toml, list_profiles, load_profile, profile_dir
from llmpareto.errors import UserError

SHIPPED = ["raspberry-pi-5", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "snapdragon-8-gen-3",
           "apple-m2", "apple-a17-pro", "intel-core-ultra-7-155h", "rtx-4090", "h100-sxm"]


def test_required_devices_are_shipped():
    assert set(SHIPPED) <= set(list_profiles())


@pytest.mark.parametrize("name", sorted(p.stem for p in profile_dir().glob("*.toml")))
def test_every_shipped_profile_loads_with_sources(name, tmp_path):
    p = load_profile(name)
    assert p.name == name
    for key in ("memory_bytes", "bandwidth_Bps", "eta_mem", "eta_compute", "power_active_w",
                "energy_pj_per_byte", "energy_pj_per_flop", *(f"peak_flops.{d}" for d in
                                                               p.peak_flops)):
        src = p.sources[key]
        assert src.startswith(("http", "derived:")) or "http" in src, (key, src)
    copy = tmp_path / "copy.toml"
    copy.write_text(dump_toml(p))
    assert load_profile(str(copy)) == p  # round trip, and a path works where a name does


_KERNEL = {"runtime": "vLLM", "formats": ["f16"], "decode_speedup": 1.2, "prefill_speedup": 1.1}


def _write(tmp_path, mutate):
    data = tomllib.loads((profile_dir() / "raspberry-pi-5.toml").read_text())
    data.pop("measurements", None)  # optional; test_profile_check covers its rows
    mutate(data)
    from llmpareto.device_profiles.loader import _toml_value

    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table in ("peak_flops", "sources"):
        if table in data:
            lines += [f"[{table}]"] + [f'"{k}" = {_toml_value(v)}' for k, v in data[table].items()]
    for pattern, row in data.get("sparse_kernels", {}).items():
        lines += [f'[sparse_kernels."{pattern}"]'] + [f"{k} = {_toml_value(v)}"
                                                      for k, v in row.items()]
    f = tmp_path / "bad.toml"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(bandwith_Bps=1.0), "unknown field.*bandwith_Bps"),
    (lambda d: d.pop("eta_mem"), "missing field.*eta_mem"),
    (lambda d: d.update(memory_bytes="8GB"), "'memory_bytes' must be a number"),
    (lambda d: d.update(bandwidth_Bps=-1.0), "'bandwidth_Bps' = -1.0 is out of range"),
    (lambda d: d.update(eta_compute=0.0), "'eta_compute' = 0.0 is out of range"),
    (lambda d: d.update(eta_mem=1.5), "'eta_mem' = 1.5 is out of range"),
    (lambda d: d.update(fast_formats=["q4_k"]), "'fast_formats' has unknown value"),
    (lambda d: d.update(sparse=["4:8"]), "'sparse' has unknown value"),
    (lambda d: d["peak_flops"].update(fp8=1e12), "unknown dtype"),
    (lambda d: d["sources"].pop("power_idle_w"), "no source for power_idle_w"),
    (lambda d: d.update(power_idle_w=50.0), "power_idle_w is above power_active_w"),
    (lambda d: d.update(schema_version=7), "schema_version 7"),
    (lambda d: d.update(attention_values_per_s=-1.0), "'attention_values_per_s' = -1.0 is out"),
    (lambda d: d.update(attention_values_per_s=2e9), "no source for attention_values_per_s"),
    (lambda d: d.update(sparse=["2:4"]), "'sparse' lists .'2:4'. but .sparse_kernels. describes"),
    (lambda d: d.update(sparse=["2:4"], sparse_kernels={"2:4": dict(_KERNEL, formats=["q4_k"])}),
     "sparse_kernels.2:4: formats must be"),
    (lambda d: d.update(sparse=["2:4"], sparse_kernels={"2:4": dict(_KERNEL,
                                                                    decode_speedup=0.0)}),
     "'sparse_kernels.2:4.decode_speedup' = 0.0 is out of range"),
    (lambda d: d.update(sparse=["2:4"], sparse_kernels={"2:4": _KERNEL}),
     "no source for sparse_kernels.2:4"),
])
def test_bad_profiles_name_file_and_field(tmp_path, mutate, match):
    f = _write(tmp_path, mutate)
    with pytest.raises(UserError, match=match) as exc:
        load_profile(str(f))
    assert str(f) in str(exc.value)


def test_bad_toml_unknown_name_and_missing_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("name = [unclosed")
    with pytest.raises(UserError, match="not valid TOML"):
        load_profile(str(f))
    with pytest.raises(UserError, match="unknown device.*raspberry-pi-5"):
        load_profile("toaster-9000")
    with pytest.raises(UserError, match="no such file"):
        load_profile(str(tmp_path / "missing.toml"))


def test_devices_cli(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED) and "bandwidth_GBps" in out
    assert main(["devices", "apple-m2"]) == 0
    out = capsys.readouterr().out
    assert "eta_mem" in out and "derived:" in out and "http" in out


def test_cost_cli_on_a_config_only_model(capsys, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                tie_word_embeddings=False).save_pretrained(tmp_path)
    assert not any(tmp_path.glob("*.safetensors"))
    assert main(["cost", "--model", str(tmp_path), "--device", "apple-m2", "--format", "q4_0",
                 "--context", "2048", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    t = data["totals"]
    assert t["kv_cache_bytes"] == 1_073_741_824
    assert 15 < t["decode_tokens_per_s"] < 30  # llama.cpp measures ~22 tok/s for 7B q4_0 on M2
    kinds = {(r["phase"], r["kind"]) for r in data["breakdown"]}
    assert ("decode", "mlp.down_proj") in kinds and ("prefill", "attention") in kinds
    assert {r["bound"] for r in data["breakdown"] if r["phase"] == "decode"} == {"memory"}
    assert main(["cost", "--model", str(tmp_path), "--device", "apple-m2"]) == 0
    out = capsys.readouterr().out
    assert "ms/token" in out and "fits" in out
