"""--torch-device and --torch-dtype on any machine (CI has no GPU): how they resolve, what they
refuse and with which numbers, and the non-float32 code path that CUDA runs take, here on the
CPU in bfloat16. The CUDA runs themselves: tests/test_cuda.py (marked `cuda`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmpareto.errors import UserError
from llmpareto.placement import Placement, check_runs, cuda_count, resolve

NO_CUDA = pytest.mark.skipif(cuda_count() > 0, reason="this machine has CUDA")


@NO_CUDA
def test_auto_is_the_cpu_in_float32_without_cuda():
    assert resolve() == Placement("cpu", "float32")
    assert resolve("cpu", "bfloat16") == Placement("cpu", "bfloat16")


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(spec):
    with pytest.raises(UserError) as info:
        resolve(spec)
    msg = str(info.value)
    assert msg.startswith(f"--torch-device {spec}: this machine has no CUDA GPU")
    assert "--torch-device cpu" in msg


def test_a_gpu_index_the_machine_does_not_have(monkeypatch):
    from llmpareto import placement

    monkeypatch.setattr(placement, "cuda_count", lambda: 1)
    with pytest.raises(UserError) as info:
        resolve("cuda:3")
    assert "--torch-device cuda:3: this machine has 1 CUDA GPU (cuda:0)" in str(info.value)


@pytest.mark.parametrize("device, dtype, phrase", [
    ("gpu", "auto", "--torch-device 'gpu'"), ("cuda:x", "auto", "--torch-device 'cuda:x'"),
    ("CUDA", "auto", "cuda:N"), ("cpu", "int8", "--torch-dtype 'int8'"),
    ("cpu", "fp16", "float16"),
])
def test_bad_forms_name_the_flag_and_the_choices(device, dtype, phrase):
    with pytest.raises(UserError) as info:
        resolve(device, dtype)
    assert phrase in str(info.value)


def test_settings_check_the_forms_before_anything_loads():
    from llmpareto.search.settings import SearchSettings

    with pytest.raises(UserError, match="--torch-device"):
        SearchSettings(torch_device="tpu")
    with pytest.raises(UserError, match="--gpus-per-trial"):
        SearchSettings(gpus_per_trial=-1)
    assert SearchSettings(gpus_per_trial="0.5").gpus_per_trial == 0.5


def test_a_dtype_the_device_has_no_kernels_for_is_refused(monkeypatch):
    check_runs("cpu", "float16")  # torch's CPU kernels run float16: allowed

    def no_half(*args, **kwargs):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'\nmore')

    monkeypatch.setattr(torch.nn.functional, "linear", no_half)
    with pytest.raises(UserError) as info:
        check_runs("cpu", "float16")
    msg = str(info.value)
    assert msg.startswith("--torch-dtype float16: cpu cannot run float16 (")
    assert "not implemented for 'Half'" in msg and "more" not in msg


def test_memory_needed_on_the_device_and_the_host(tiny_model_dir, tmp_path):
    from llmpareto.models import load_need, resolve_model

    st = resolve_model(str(tiny_model_dir))
    _, n, host, device = load_need(st)
    assert (host, device) == (4 * n, 0)  # float32 on the CPU, as before
    assert load_need(st, Placement("cpu", "bfloat16"))[2:] == (2 * n, 0)
    # safetensors go straight to the GPU: nothing of the model stays on the host
    assert load_need(st, Placement("cuda:0", "bfloat16"))[2:] == (0, 2 * n)
    from llmpareto.tests.test_untrusted import write_gguf

    g = resolve_model(str(write_gguf(tmp_path / "m.gguf")))
    _, m, host, device = load_need(g, Placement("cuda:0", "float16"))
    # transformers dequantizes a GGUF on the host and fills the model there, then it moves
    assert (host, device) == (4 * m + 2 * m, 2 * m)


def test_a_model_too_large_for_the_gpu_is_refused_before_loading(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from llmpareto import models
    from llmpareto.models import load_model, load_need, resolve_model

    monkeypatch.setattr(models, "device_free_bytes", lambda p: 1000)
    loaded = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(1))
    source = resolve_model(str(tiny_model_dir))
    need = load_need(source, Placement("cuda:0", "bfloat16"))[3]
    with pytest.raises(UserError) as info:
        load_model(source, Placement("cuda:0", "bfloat16"))
    msg = str(info.value)
    assert "needs about" in msg and f"({need} bytes) on cuda:0 in bfloat16" in msg
    assert "(1000 bytes) free" in msg and not loaded


def test_bfloat16_model_quantizes_its_own_weights_and_dequantizes_to_its_dtype(tiny_model_dir):
    """A bfloat16 model's variants are made from its bfloat16 weights (on the host, in float32:
    exact) and dequantized into bfloat16: the same codes as a float32 model holding the same
    values, and the same weights rounded once."""
    from llmpareto.arch import Arch
    from llmpareto.compress import VariantCache
    from llmpareto.models import load_model, resolve_model

    source = resolve_model(str(tiny_model_dir))
    m16, _ = load_model(source, Placement("cpu", "bfloat16"))
    m32, _ = load_model(source)
    for p in m32.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    c16, c32 = VariantCache(m16, Arch.from_model(m16)), VariantCache(m32, Arch.from_model(m32))
    assert c16.dtype == torch.bfloat16 and c32.dtype == torch.float32
    for fqn in list(c32.shapes)[:5]:
        assert c16.host_source(fqn).dtype == torch.float32
        for fmt in ("q8_0", "q4_0", "q5_1", "f16"):
            assert np.array_equal(c16.get(fqn, fmt), c32.get(fqn, fmt)), (fqn, fmt)
            d16 = c16.dequantized(fqn, fmt)
            assert d16.dtype == torch.bfloat16
            assert torch.equal(d16, c32.dequantized(fqn, fmt).to(torch.bfloat16))


def test_one_recipe_scores_alike_in_float32_and_bfloat16(tiny_settings):
    """The path a CUDA run takes (a non-float32 model, variants cast to it, inputs moved to the
    model's device) scores one recipe as float32 does, within bfloat16's rounding: 0.5% of
    perplexity, 1e-4 nats of KL on this tiny random model (measured: 0.015%, 9e-6 nats)."""
    from llmpareto.recipe import Recipe
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    recipe = Recipe({"_default": {"format": "q4_0"}})
    scores = {}
    for dtype in ("float32", "bfloat16"):
        s = SearchSettings(**{**tiny_settings, "torch_dtype": dtype,
                              "objectives": ["perplexity", "kl_nats", "memory_bytes"]})
        runner = TrialRunner(s)
        assert runner.placement == Placement("cpu", dtype)
        assert next(runner.model.parameters()).dtype == getattr(torch, dtype)
        scores[dtype] = runner.run(recipe).metrics
    a, b = scores["float32"], scores["bfloat16"]
    assert abs(b["perplexity"] / a["perplexity"] - 1) < 0.005, (a, b)
    assert abs(b["kl_nats"] - a["kl_nats"]) < 1e-4 and b["kl_nats"] > 0, (a, b)
    assert a["memory_bytes"] == b["memory_bytes"]  # the cost model reads formats, not dtypes


def test_search_records_where_it_ran_and_pick_rebuilds_in_that_dtype(tiny_settings):
    import llmpareto
    from llmpareto.rundir import RunDir
    from llmpareto.search.workbench import Workbench

    llmpareto.search(**{**tiny_settings, "trials": 3, "torch_device": "cpu",
                        "torch_dtype": "bfloat16"})
    run = RunDir.for_study(tiny_settings["runs_dir"], "t")
    info = json.loads(run.run_json.read_text())
    assert info["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    assert info["cache"]["peak_device_bytes"] is None  # no GPU memory on a CPU run
    assert next(Workbench.from_run(run.path).model.parameters()).dtype == torch.bfloat16
    # --resume with the default (auto) keeps the dtype the trials ran in; another is refused
    llmpareto.search(**{**tiny_settings, "trials": 4, "resume": True})
    info = json.loads(run.run_json.read_text())
    assert info["placement"]["dtype"] == "bfloat16" and info["completed_trials"] == 4
    with pytest.raises(UserError, match="torch_dtype: was 'bfloat16', now 'float32'"):
        llmpareto.search(**{**tiny_settings, "trials": 5, "resume": True,
                            "torch_dtype": "float32"})


def test_ray_places_trials_on_the_device_ray_gave_them():
    from llmpareto.search.ray_backend import check_gpus, worker_placement
    from llmpareto.search.settings import SearchSettings

    assert worker_placement({"gpus_per_trial": 0.5, "torch_device": "auto"})["torch_device"] \
        == "cuda"
    assert worker_placement({"gpus_per_trial": 0, "torch_device": "auto"})["torch_device"] \
        == "cpu"
    with pytest.raises(UserError, match="the Ray cluster has 0 GPUs"):
        check_gpus(SearchSettings(gpus_per_trial=1), {"CPU": 2.0})
    with pytest.raises(UserError, match="--gpus-per-trial 1"):
        check_gpus(SearchSettings(torch_device="cuda"), {"CPU": 2.0, "GPU": 1.0})
    check_gpus(SearchSettings(gpus_per_trial=0.5), {"CPU": 2.0, "GPU": 1.0})


@NO_CUDA
def test_gpu_trials_on_a_real_ray_cluster_without_gpus_are_refused(tiny_model_dir, tmp_path,
                                                                   capsys):
    """Ray started here (a real cluster of one node, no GPU): Tune would wait forever for a GPU
    trial, so the search says so first."""
    from llmpareto.cli import main

    code = main(["search", "--backend", "ray", "--model", str(tiny_model_dir), "--runs-dir",
                 str(tmp_path), "--study", "g", "--gpus-per-trial", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "llmpareto: error: --gpus-per-trial 1: the Ray cluster has 0 GPUs" in err


@NO_CUDA
def test_a_worker_picks_its_device_and_is_refused_one_it_lacks(tiny_settings, tmp_path, capsys):
    import llmpareto
    from llmpareto.cli import main

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    llmpareto.search(**{**tiny_settings, "storage": url, "create_only": True})
    code = main(["worker", "--study", "t", "--storage", url, "--runs-dir", str(tmp_path / "w"),
                 "--torch-device", "cuda:3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "llmpareto: error: --torch-device cuda:3: this machine has" in err


@NO_CUDA
def test_doctor_says_where_trials_run_by_default():
    from llmpareto.cli.doctor import _torch

    r = _torch(None)
    assert r["status"] == "ok" and "trials run on cpu in float32 by default" in r["detail"]


_FRAGMENTED = """
import sys, torch
from llmpareto.placement import release_freed_host_memory
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
x = torch.ones(2 * 2**20); del x  # 8 MB, mapped: freeing it raises glibc's mmap threshold
ts = [torch.ones(2**20) for _ in range(128)]  # 512 MiB of 4 MB tensors, carved from the heap
keep = ts[-1]; del ts  # all but the last freed: the heap's top stays held
before = rss(); ok = release_freed_host_memory(); after = rss()
print(before, after, ok)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_freed_tensors_memory_is_handed_back_to_the_system(tmp_path):
    """What a variant cache drops is freed inside the process; without the hand-back glibc keeps
    the pages (here 512 MiB of dropped 4 MB tensors stay resident) and a search grows past its
    caches' bounds. In a fresh process: the allocator's state decides."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _FRAGMENTED], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout.split()
    before, after, ok = int(out[0]), int(out[1]), out[2] == "True"
    if not ok:
        pytest.skip("no glibc malloc_trim on this system")
    assert before - after > 0.75 * 512 * 2**20, (before, after)


def test_a_cache_hands_freed_memory_back_as_it_drops_variants(tiny_model_dir, monkeypatch):
    """Every TRIM_BYTES of variants dropped (either level), the freed host memory is handed
    back; a cache that never drops never calls it."""
    from llmpareto.arch import Arch
    from llmpareto.compress import VariantCache, cache
    from llmpareto.models import load_model, resolve_model

    calls = []
    monkeypatch.setattr(cache, "release_freed_host_memory", lambda: calls.append(1) or True)
    model, _ = load_model(resolve_model(str(tiny_model_dir)))
    roomy = VariantCache(model, Arch.from_model(model))
    fqns = list(roomy.shapes)
    for fmt in ("q8_0", "q4_0", "f16"):
        for fqn in fqns:
            roomy.dequantized(fqn, fmt)
    assert calls == []
    size = max(roomy.dequantized(f, "q8_0").numel() * 4 for f in fqns[:6])
    monkeypatch.setattr(cache, "TRIM_BYTES", 2 * size)
    tight = VariantCache(model, Arch.from_model(model), dense_bytes=2 * size,
                         packed_bytes=2 * size)
    for fmt in ("q8_0", "q4_0", "f16", "q5_0"):
        for fqn in fqns[:6]:
            tight.dequantized(fqn, fmt)
    # 24 dense variants of at most `size` through a level holding 2 of the largest: well over
    # 2 * size dropped
    assert calls, "no hand-back while the cache dropped variants"
    assert len(calls) <= tight.misses  # at most one per variant made
