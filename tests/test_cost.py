"""Cost model: the survey's arithmetic exactly, and the roofline behaving as physics says."""

import dataclasses

import pytest

from llmpareto.arch import Arch, Tensor2D
from llmpareto.budget import Workload
from llmpareto.device_profiles import load_profile
from llmpareto.evaluators import Candidate, LatencyEnergyEvaluator, MemoryEvaluator
from llmpareto.evaluators.cost import kv_cache_bytes, op_costs, summarize
from llmpareto.recipe import Recipe


def synthetic(layers: int, rows: int, cols: int, kv_heads: int = 32,
              head_dim: int = 128) -> Arch:
    """Linears only, one (rows x cols) per layer; the embedding holds no parameters."""
    lin = [Tensor2D(f"model.layers.{i}.mlp.proj", rows, cols, i, "mlp.proj")
           for i in range(layers)]
    return Arch(linears=lin, embedding=Tensor2D("model.embed_tokens", 0, cols, None, "embed"),
                lm_head=None, other_params=0, n_layers=layers, n_kv_heads=kv_heads,
                head_dim=head_dim, hidden_size=kv_heads * head_dim, vocab_size=1,
                n_heads=kv_heads)


def mem(arch, fmt, context=2048):
    r = Recipe.uniform(fmt)
    return MemoryEvaluator(arch, Workload(context=context)).evaluate(
        Candidate(r, arch.formats_for(r)))


def test_survey_weights_7b():
    arch = synthetic(56, 31250, 4000)
    assert sum(t.numel for t in arch.linears) == 7_000_000_000
    assert mem(arch, "f16")["weights_bytes"] == 14.0e9
    q8, q4 = mem(arch, "q8_0"), mem(arch, "q4_0")
    assert q8["weights_bytes"] - q8["scale_overhead_bytes"] == 7.0e9
    assert q4["weights_bytes"] - q4["scale_overhead_bytes"] == 3.5e9
    assert q8["scale_overhead_bytes"] == q4["scale_overhead_bytes"] == 7e9 / 32 * 2  # f16 scales


def test_survey_kv_cache_llama7b():
    arch = synthetic(32, 4096, 4096)  # hidden 4096 = 32 heads x 128, 32 layers
    assert kv_cache_bytes(arch, 1) == 524_288
    assert kv_cache_bytes(arch, 2048) == 1_073_741_824
    assert mem(arch, "f16", context=2048)["kv_cache_bytes"] == 1_073_741_824


def test_survey_flops_per_token_2_7b():
    arch = synthetic(27, 10000, 10000)
    p = load_profile("raspberry-pi-5")
    ops = op_costs(arch, arch.formats_for(Recipe.uniform("f16")), p, Workload(context=1))
    matmul = sum(o.flops for o in ops if o.phase == "decode" and o.kind not in ("attention",))
    assert matmul == 5.4e9


def test_decode_on_a_bandwidth_bound_device_scales_with_bytes():
    arch = synthetic(32, 53248, 4096)  # 7e9 parameters
    p = load_profile("raspberry-pi-5")
    w = Workload(context=16)
    lat = {f: LatencyEnergyEvaluator(arch, p, w).evaluate(
        Candidate(Recipe.uniform(f), arch.formats_for(Recipe.uniform(f))))["latency_ms"]
        for f in ("f16", "q8_0", "q4_0")}
    assert 0.5 < lat["q8_0"] / lat["f16"] < 0.56  # 8.5 / 16 bits = 0.53
    assert 0.5 < lat["q4_0"] / lat["q8_0"] < 0.56  # 4.5 / 8.5 bits = 0.53


def test_compute_bound_prefill_ignores_format_unless_a_kernel_is_faster():
    arch = synthetic(16, 15360, 4096)
    w = Workload(prompt_tokens=2048, context=2048)
    base = load_profile("raspberry-pi-5")

    def prefill(profile, fmt):
        r = Recipe.uniform(fmt)
        return summarize(op_costs(arch, arch.formats_for(r), profile, w), arch, profile, w)[
            "prefill_ms"]

    # q8_0 and q4_0 both run int8 dot kernels: same compute-bound prefill
    assert prefill(base, "q8_0") == pytest.approx(prefill(base, "q4_0"), rel=1e-3)
    # no native kernel (int4_g128 on llama.cpp): costed as dequantized f16, like f16 itself
    assert prefill(base, "int4_g128") == pytest.approx(prefill(base, "f16"), rel=1e-3)
    # a device whose int8 kernel is no faster than f16: the format stops mattering at all
    flat = dataclasses.replace(base, peak_flops={"f16": base.peak("f16"), "int8": base.peak("f16")})
    assert prefill(flat, "q8_0") == pytest.approx(prefill(flat, "f16"), rel=1e-3)
    assert prefill(base, "q8_0") < 0.6 * prefill(base, "f16")  # int8 peak is 2x f16 on the Pi


def test_energy_traces_to_the_profile():
    arch = synthetic(16, 15360, 4096)
    p = load_profile("raspberry-pi-5")
    w = Workload(context=128)
    r = Recipe.uniform("q4_0")
    ops = op_costs(arch, arch.formats_for(r), p, w)
    s = summarize(ops, arch, p, w)
    dec = [o for o in ops if o.phase == "decode"]
    joules = (sum(o.bytes for o in dec) * p.energy_pj_per_byte
              + sum(o.flops for o in dec) * p.energy_pj_per_flop) * 1e-12 \
        + p.power_idle_w * s["latency_ms"] / 1e3
    assert s["energy_mj"] == pytest.approx(joules * 1e3)
    assert s["decode_tokens_per_s"] == pytest.approx(1e3 / s["latency_ms"])


def test_measured_attention_rate_charges_decode_per_cached_value():
    # 8 blocks, 8 query heads sharing 2 KV heads of 64 dims
    arch = dataclasses.replace(synthetic(8, 1024, 1024, kv_heads=2, head_dim=64), n_heads=8)
    base = load_profile("raspberry-pi-5")
    rate = 1e8  # cached K values per second
    slow = dataclasses.replace(base, attention_values_per_s=rate)
    r = Recipe.uniform("q4_0")

    def attention_s(profile, context, a=arch):
        ops = op_costs(a, a.formats_for(r), profile, Workload(context=context))
        return next(o.seconds for o in ops if o.phase == "decode" and o.kind == "attention")

    # 8 blocks x 2 KV heads x 64 dims x 1000 positions / 1e8 per s = 10.24 ms, linear in the
    # context, and in the KV heads rather than the query heads
    assert attention_s(slow, 1000) == pytest.approx(8 * 2 * 64 * 1000 / rate)
    assert attention_s(slow, 2000) == pytest.approx(2 * attention_s(slow, 1000))
    full = dataclasses.replace(arch, n_kv_heads=8)
    assert attention_s(slow, 1000, full) == pytest.approx(4 * attention_s(slow, 1000))
    # unset (0): only the KV bytes' roofline (4 MB of f16 K and V: ~0.4 ms on the Pi 5)
    assert attention_s(base, 1000) < 0.1 * attention_s(slow, 1000)
    # a rate faster than the KV bytes can stream never makes attention quicker than the bytes
    fast = dataclasses.replace(base, attention_values_per_s=1e15)
    assert attention_s(fast, 1000) == attention_s(base, 1000)


def _sparse_profile(speedup: float = 1.25):
    from llmpareto.device_profiles.schema import SparseKernel

    base = load_profile("rtx-4090")
    kernel = SparseKernel("a 2:4 runtime", ("f16",), speedup, 1.1)
    return dataclasses.replace(base, sparse=("2:4",), sparse_kernels={"2:4": kernel})


def _costs(arch, recipe, profile, w=None):
    w = w or Workload(context=16, prompt_tokens=8)
    cand = Candidate(recipe, arch.formats_for(recipe))
    out = MemoryEvaluator(arch, w, profile).evaluate(cand)
    out.update(LatencyEnergyEvaluator(arch, profile, w).evaluate(cand))
    out["matmul_decode_s"] = sum(o.seconds for o in op_costs(
        arch, cand.formats, profile, w, arch.sparsity_for(recipe))
        if o.phase == "decode" and o.kind == "mlp.proj")
    return out


def test_2_4_saves_bytes_and_the_cited_speedup_only_where_the_runtime_runs_it():
    arch = synthetic(4, 4096, 4096)
    numel = 4 * 4096 * 4096
    dense, pruned = Recipe.uniform("f16"), Recipe({"_default": {"format": "f16", "pattern": "2:4"}})
    sp = _sparse_profile(1.25)
    d, s = _costs(arch, dense, sp), _costs(arch, pruned, sp)
    # kept half in f16 + 2 index bits per kept weight: 9 bits a weight
    assert d["weights_bytes"] == 2 * numel and s["weights_bytes"] == numel * 9 / 8
    assert s["matmul_decode_s"] == pytest.approx(d["matmul_decode_s"] / 1.25, rel=1e-12)
    assert s["latency_ms"] < d["latency_ms"] and s["nonzero_params"] == numel / 2
    # a format the sparse kernels do not take: stored and run dense, zeros included
    q4, q4p = Recipe.uniform("q4_0"), Recipe({"_default": {"format": "q4_0", "pattern": "2:4"}})
    assert {k: v for k, v in _costs(arch, q4p, sp).items() if k != "nonzero_params"} == \
        {k: v for k, v in _costs(arch, q4, sp).items() if k != "nonzero_params"}
    # no sparse runtime (raspberry-pi-5, and the llama.cpp rtx-4090 profile itself): the
    # pruned model costs exactly what the dense one does, unstructured or 2:4
    half = Recipe({"_default": {"format": "f16", "sparsity": 0.5}})
    for name in ("raspberry-pi-5", "jetson-agx-orin-64gb"):
        p = load_profile(name)
        base = _costs(arch, dense, p)
        for r in (pruned, half):
            c = _costs(arch, r, p)
            assert c.pop("nonzero_params") == numel / 2
            assert c == {k: v for k, v in base.items() if k != "nonzero_params"}


def test_nonzero_params_is_exact_per_module():
    from llmpareto.evaluators.cost import nonzero_params

    arch = synthetic(3, 7, 9)  # 63 weights a module: 30% prunes round(18.9) = 19
    r = Recipe({"model.layers.0.mlp.proj": {"format": "f16", "sparsity": 0.3},
                "model.layers.1.mlp.proj": {"format": "f16", "pattern": "1:3"}})
    assert nonzero_params(arch, arch.sparsity_for(r)) == (63 - 19) + 21 + 63


def test_cost_of_a_config_folder_never_imports_torch(tmp_path):
    """DESIGN: cost evaluators need no torch. `llmpareto cost` on a config.json folder (a
    student recipe included) runs in a fresh process that never imports torch or
    transformers."""
    import json
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "tie_word_embeddings": False}))
    (tmp_path / "recipe.json").write_text(json.dumps({
        "version": 1, "modules": {"_default": {"format": "q4_K"}},
        "structure": {"layers": list(range(24)), "mlp_ratio": 0.75, "heads": 4}}))
    code = ("import sys, io, contextlib\nfrom llmpareto.cli import main\n"
            "for extra in (['--format', 'q4_K'], ['--recipe', sys.argv[2]]):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main(['cost', '--model', sys.argv[1], '--device', 'raspberry-pi-5',"
            " *extra]) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "recipe.json")],
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
