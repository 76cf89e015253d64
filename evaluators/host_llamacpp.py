"""Calibrate a host profile for the llama.cpp runtime (`profile-host --runtime llamacpp`).

Calibration models are tiny random Llamas exported to GGUF in several formats, none of them a
model that a benchmark validates on. Fitted: eta_mem and the per-token / per-layer overheads
(least squares of measured decode time on predicted bytes), and eta_compute from prompt
processing.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from llmpareto.device_profiles.schema import DeviceProfile
from llmpareto.formats import GGUF_FORMATS

# (hidden, intermediate, layers): 1M to 128M weights, so the larger ones stream from DRAM as
# real models do; their shapes are unlike the models the benchmarks validate on.
CALIBRATION = ((256, 704, 4), (512, 1408, 8), (1024, 2816, 4), (1024, 2816, 10))
QUICK_CALIBRATION = ((256, 704, 2), (512, 1408, 4))
CAL_FORMATS = ("f16", "q8_0", "q4_0")
CONTEXT = 256


def _calibration_ggufs(folder: Path, shapes) -> list[tuple[Path, object, dict]]:
    """Export each calibration model in each format; returns (path, arch, formats)."""
    from llmpareto.arch import Arch
    from llmpareto.compress import VariantCache, apply
    from llmpareto.export_gguf import write_gguf
    from llmpareto.models import load_model, resolve_model
    from llmpareto.recipe import Recipe
    from llmpareto.tiny import build_tiny_model

    out = []
    for i, (hidden, inter, layers) in enumerate(shapes):
        d = build_tiny_model(folder / f"m{i}", seed=i, hidden_size=hidden,
                             intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                             max_position_embeddings=1024)
        source = resolve_model(str(d))
        model, tok = load_model(source)
        arch = Arch.from_model(model)
        cache = VariantCache(model, arch, dense_bytes=0)
        for fmt in CAL_FORMATS:
            formats = apply(model, Recipe.uniform(fmt), cache)
            path = write_gguf(folder / f"m{i}-{fmt}.gguf", model, cache, formats, source, tok)
            out.append((path, arch, formats))
    return out


def _predicted_parts(arch, formats, profile: DeviceProfile, context: int):
    """(decode bytes, prefill FLOPs by dtype time at eta 1) from the cost model's op list."""
    from llmpareto.budget import Workload
    from llmpareto.evaluators.cost import op_costs

    w = Workload(prompt_tokens=128, context=context)
    ops = op_costs(arch, formats, profile, w)
    dec_bytes = sum(o.bytes for o in ops if o.phase == "decode")
    ideal = dataclasses.replace(profile, eta_compute=1.0, eta_mem=1.0)
    pre_s = sum(o.seconds for o in op_costs(arch, formats, ideal, w) if o.phase == "prefill")
    return dec_bytes, pre_s


def calibrate_llamacpp(base: DeviceProfile, quick: bool = False,
                       threads: int | None = None) -> DeviceProfile:
    """Return `base` with llama.cpp's measured efficiencies, overheads and kernels."""
    import llama_cpp

    from llmpareto.evaluators.llamacpp import gguf_speed

    profile = dataclasses.replace(base, fast_formats=tuple(GGUF_FORMATS))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path, arch, formats in _calibration_ggufs(Path(tmp), QUICK_CALIBRATION if quick
                                                      else CALIBRATION):
            m = gguf_speed(str(path), prompt_tokens=128, decode_tokens=24 if quick else 64,
                           context=CONTEXT, threads=threads)
            dec_bytes, pre_ideal_s = _predicted_parts(arch, formats, profile, CONTEXT)
            rows.append((dec_bytes / profile.bandwidth_Bps, arch.n_layers,
                         m["measured_latency_ms"] / 1e3, pre_ideal_s,
                         128 / m["measured_prompt_tokens_per_s"]))
    a = np.array(rows)
    # decode: t = (bytes / bandwidth) / eta_mem + overhead_token + overhead_layer * layers
    coef, *_ = np.linalg.lstsq(np.c_[a[:, 0], np.ones(len(a)), a[:, 1]], a[:, 2], rcond=None)
    inv_eta, per_token, per_layer = (max(float(c), 0.0) for c in coef)
    eta_mem = float(np.clip(1.0 / inv_eta if inv_eta > 0 else 1.0, 0.01, 1.0))
    eta_compute = float(np.clip(np.median(a[:, 3] / a[:, 4]), 0.01, 1.0))
    today = time.strftime("%Y-%m-%d")
    how = (f"derived: measured {today} with llama-cpp-python {llama_cpp.__version__} on "
           f"{len(a)} calibration GGUFs (tiny random Llamas {CALIBRATION if not quick else QUICK_CALIBRATION} "
           f"x {CAL_FORMATS}), decode at context {CONTEXT}")
    sources = dict(base.sources)
    sources.update({
        "eta_mem": f"{how}: least-squares slope of decode time on predicted bytes / bandwidth",
        "overhead_s_per_token": f"{how}: intercept of the same fit",
        "overhead_s_per_layer": f"{how}: per-layer term of the same fit",
        "eta_compute": f"{how}: median of ideal roofline prefill time / measured (128 tokens)",
        "fast_formats": "derived: llama.cpp's CPU backend has kernels for every GGUF format",
    })
    return dataclasses.replace(
        profile, runtime=f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) CPU, "
        f"{threads or 'default'} threads", eta_mem=eta_mem, eta_compute=eta_compute,
        overhead_s_per_token=per_token, overhead_s_per_layer=per_layer, sources=sources)
