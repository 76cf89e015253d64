"""Calibrate a host profile for the llama.cpp runtime (`profile-host --runtime llamacpp`).

Calibration models are random Llamas exported to GGUF in every GGUF format, none of them a
model a benchmark validates on. One least-squares fit of decode time gives each format's
kernel rate (weights/s), the per-layer and per-token overheads; prefill gives eta_compute.
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
CALIBRATION = ((256, 768, 4), (512, 1536, 8), (1024, 2816, 4), (1024, 2816, 10))
QUICK_CALIBRATION = ((256, 768, 2), (512, 1536, 4))
CAL_FORMATS = GGUF_FORMATS  # rows are multiples of 256, so tq2_0 holds everywhere
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


def _prefill_ideal_s(arch, formats, profile: DeviceProfile) -> float:
    """Roofline prefill time of 128 tokens at eta 1 (what eta_compute scales)."""
    from llmpareto.budget import Workload
    from llmpareto.evaluators.cost import op_costs

    ideal = dataclasses.replace(profile, eta_compute=1.0, eta_mem=1.0, kernel_weights_per_s={})
    ops = op_costs(arch, formats, ideal, Workload(prompt_tokens=128, context=CONTEXT))
    return sum(o.seconds for o in ops if o.phase == "prefill")


def _fit(rows: list[dict]) -> tuple[dict[str, float], float, float]:
    """t = s[format] * weights + per_layer * layers + per_token, jointly over all rows."""
    fmts = sorted({r["format"] for r in rows})
    x = np.array([[r["weights"] if r["format"] == f else 0.0 for f in fmts]
                  + [r["layers"], 1.0] for r in rows])
    y = np.array([r["seconds"] for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    slopes = {f: float(c) for f, c in zip(fmts, coef[: len(fmts)])}
    return slopes, max(float(coef[-2]), 0.0), max(float(coef[-1]), 0.0)


def calibrate_llamacpp(base: DeviceProfile, quick: bool = False,
                       threads: int | None = None) -> DeviceProfile:
    """Return `base` with llama.cpp's measured kernel rates, overheads and efficiencies."""
    import llama_cpp

    from llmpareto.evaluators.llamacpp import gguf_speed
    from llmpareto.formats import get_format

    profile = dataclasses.replace(base, fast_formats=tuple(GGUF_FORMATS))
    shapes = QUICK_CALIBRATION if quick else CALIBRATION
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path, arch, formats in _calibration_ggufs(Path(tmp), shapes):
            m = gguf_speed(str(path), prompt_tokens=128, decode_tokens=24 if quick else 48,
                           context=CONTEXT, threads=threads)
            head = arch.lm_head or arch.embedding
            rows.append({"format": next(f for f in formats.values() if f), "layers": arch.n_layers,
                         "weights": sum(t.numel for t in arch.linears) + head.numel,
                         "seconds": m["measured_latency_ms"] / 1e3,
                         "prefill_ratio": _prefill_ideal_s(arch, formats, profile)
                         / (128 / m["measured_prompt_tokens_per_s"])})
    slopes, per_layer, per_token = _fit(rows)
    rates = {f: 1.0 / s for f, s in slopes.items() if s > 0}
    # DRAM side: the fastest bytes/s any kernel reached; slower formats are kernel-bound
    best_Bps = max(get_format(f).bits_per_weight / 8 * r for f, r in rates.items())
    eta_mem = float(np.clip(best_Bps / profile.bandwidth_Bps, 0.01, 1.0))
    eta_compute = float(np.clip(np.median([r["prefill_ratio"] for r in rows]), 0.01, 1.0))
    how = (f"derived: measured {time.strftime('%Y-%m-%d')} with llama-cpp-python "
           f"{llama_cpp.__version__}: decode at context {CONTEXT} of random Llamas "
           f"(hidden, ffn, blocks) {shapes} in every GGUF format, least squares t = "
           "weights/rate[format] + per_layer*blocks + per_token")
    sources = {**base.sources,
               "eta_mem": f"{how}; fastest kernel's bytes/s over bandwidth_Bps",
               "overhead_s_per_token": f"{how}; per_token", "overhead_s_per_layer":
               f"{how}; per_layer", "fast_formats": "derived: llama.cpp's CPU backend has "
               "kernels for every GGUF format",
               "eta_compute": f"{how}; median ideal roofline prefill time / measured (128 tokens)"}
    sources.update({f"kernel_weights_per_s.{f}": f"{how}; rate[{f}]" for f in rates})
    return dataclasses.replace(
        profile, runtime=f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) CPU, "
        f"{threads or 'default'} threads", eta_mem=eta_mem, eta_compute=eta_compute,
        overhead_s_per_token=per_token, overhead_s_per_layer=per_layer,
        kernel_weights_per_s=rates, sources=sources)
