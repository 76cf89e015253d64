"""Calibrate a host profile for the llama.cpp runtime (`profile-host --runtime llamacpp`).

Calibration models are random Llamas exported to GGUF in every GGUF format, none of them a
model a benchmark validates on. One least-squares fit of decode time at two KV lengths gives
each format's kernel rate (weights/s), the attention rate (cached K values/s), the per-layer
and per-token overheads; prefill gives eta_compute.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpareto.device_profiles.schema import DeviceProfile
from llmpareto.formats import GGUF_FORMATS, SIMPLE_FORMATS
from llmpareto.shapes import GPU_CALIBRATION

# (hidden, intermediate, layers, KV heads): 57M to 180M weights, so they stream from DRAM as
# real models do and the per-weight cost separates from the per-token one; 1.8M to 12.8M
# weights a block, so per-block overhead separates too; grouped-query attention in two of them,
# as small models have it. Random weights, none of them a model a benchmark validates on.
# Heads are 64 wide.
CALIBRATION = ((384, 1024, 32, 2), (512, 1536, 24, 8), (768, 2048, 16, 4), (1024, 2816, 14, 16))
QUICK_CALIBRATION = ((256, 768, 2, 4), (512, 1536, 4, 2))
# tq2_0 falls back to q4_0 on 384-wide rows, as in llama.cpp. K- and i-quants are not timed
# yet (their rows need multiples of 256): a measured profile costs them by its roofline.
CAL_FORMATS = SIMPLE_FORMATS
CONTEXTS = (160, 512)  # KV lengths decode is timed at (prompt, then filled up to the second)
PROMPT = 128


def _calibration_ggufs(folder: Path, shapes) -> list[tuple[Path, object, dict]]:
    """Export each calibration model in each format; returns (path, arch, formats)."""
    from llmpareto.arch import Arch
    from llmpareto.compress import VariantCache, apply
    from llmpareto.gguf_write import write_gguf
    from llmpareto.models import load_model, resolve_model
    from llmpareto.recipe import Recipe
    from llmpareto.tiny import build_tiny_model

    out = []
    for i, (hidden, inter, layers, kv_heads, *head_dim) in enumerate(shapes):
        d = build_tiny_model(folder / f"m{i}", seed=i, hidden_size=hidden,
                             intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=hidden // (head_dim or [64])[0],
                             num_key_value_heads=kv_heads,
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


def shapes_like(arch, weights: tuple[float, ...] = (60e6, 120e6),
                max_blocks: int = 1000) -> tuple[tuple, ...]:
    """Calibration shapes with `arch`'s block (width, MLP width, KV heads, head size) at block
    counts that give about `weights` weights: kernel speed depends on matrix widths, and these
    carry the deployed model's, yet with random weights they are never a validated point."""
    per_block = sum(t.numel for t in arch.linears) / max(arch.n_layers, 1)
    inter = max(max(t.rows, t.cols) for t in arch.linears)
    return tuple((arch.hidden_size, inter, min(max_blocks, max(2, round(w / per_block))),
                  arch.n_kv_heads, arch.head_dim) for w in weights)


def _prefill_ideal_s(arch, formats, profile: DeviceProfile) -> float:
    """Roofline prefill time of PROMPT tokens at eta 1 (what eta_compute scales)."""
    from llmpareto.budget import Workload
    from llmpareto.evaluators.cost import op_costs

    ideal = dataclasses.replace(profile, eta_compute=1.0, eta_mem=1.0, kernel_weights_per_s={},
                                attention_values_per_s=0.0)
    ops = op_costs(arch, formats, ideal, Workload(prompt_tokens=PROMPT, context=PROMPT))
    return sum(o.seconds for o in ops if o.phase == "prefill")


@dataclass
class Fit:
    seconds_per_weight: dict[str, float]  # by format
    per_layer_s: float
    per_attention_value_s: float  # per cached K value read (block x KV head x dim x position)
    per_token_s: float
    residual_pct: float  # mean |relative error| of the fit on the calibration rows


def _features(arch, formats: dict[str, str | None], context: int, fmts: list[str]) -> list:
    """Decode-step regressors: weights in each format, blocks, cached K values read, 1.

    llama.cpp's decode attention time follows the KV values (blocks x KV heads x head dim x
    positions), not the query heads: measured on SmolLM2-135M (9 query, 3 KV heads), 3.1 us
    per cached position, where query-head scaling fitted on full-attention models said 7.9."""
    weights = dict.fromkeys(fmts, 0.0)
    for t in [*arch.linears, arch.lm_head or arch.embedding]:
        if formats.get(t.fqn):
            weights[formats[t.fqn]] += t.numel
    return [*(weights[f] for f in fmts), arch.n_layers,
            arch.kv_heads_total * arch.head_dim * context, 1.0]


def _fit(rows: list[dict]) -> Fit:
    """t = sum_f weights[f] * s[f] + per_layer * blocks + per_value * attention values +
    per_token, jointly over all rows, in relative terms (each row divided by its time), so
    quick and slow rows count alike."""
    fmts = sorted({f for r in rows for f in r["formats"].values() if f})
    x = np.array([_features(r["arch"], r["formats"], r["context"], fmts) for r in rows])
    y = np.array([r["seconds"] for r in rows])
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    resid = float(np.mean(np.abs(x @ coef - y) / y))
    return Fit({f: float(c) for f, c in zip(fmts, coef[: len(fmts)])}, max(float(coef[-3]), 0.0),
               max(float(coef[-2]), 0.0), max(float(coef[-1]), 0.0), 100 * resid)


def calibrate_llamacpp(base: DeviceProfile, quick: bool = False, threads: int | None = None,
                       rounds: int | None = None, like=None) -> DeviceProfile:
    """Return `base` with llama.cpp's measured kernel rates, overheads and efficiencies.

    `threads` is part of what is calibrated (the profile's `runtime` says how many): measure
    with the thread count the deployment will use. Each file is timed `rounds` times (default
    3, quick 2), interleaved, best round kept; decode is timed at two KV lengths, so the cost
    of attention over the cache separates from the weights'. `like` (an Arch) adds random
    models with its block shapes (`shapes_like`)."""
    import llama_cpp

    from llmpareto.evaluators.llamacpp import DECODE_LOOP, gguf_speeds

    profile = dataclasses.replace(base, fast_formats=tuple(GGUF_FORMATS))
    shapes = (QUICK_CALIBRATION if quick else CALIBRATION) + (
        (shapes_like(like, (2e6, 4e6), max_blocks=4) if quick else shapes_like(like))
        if like else ())
    threads = threads or os.cpu_count() or 1
    rows, prefill = [], []
    with tempfile.TemporaryDirectory() as tmp:
        files = _calibration_ggufs(Path(tmp), shapes)
        speeds = gguf_speeds([str(path) for path, _, _ in files], prompt_tokens=PROMPT,
                             decode_tokens=24 if quick else 48, contexts=CONTEXTS,
                             threads=threads, rounds=rounds or (2 if quick else 3))
        for (_, arch, formats), m in zip(files, speeds):
            rows += [{"arch": arch, "formats": formats, "context": c,
                      "seconds": m[f"measured_latency_ms@{c}"] / 1e3} for c in CONTEXTS]
            prefill.append(_prefill_ideal_s(arch, formats, profile)
                           / (PROMPT / m["measured_prompt_tokens_per_s"]))
    fit = _fit(rows)
    how = (f"derived: measured {time.strftime('%Y-%m-%d')} with llama-cpp-python "
           f"{llama_cpp.__version__}: decode at KV lengths {CONTEXTS} of random Llamas "
           f"(hidden, ffn, blocks, KV heads[, head dim]) {shapes} in every GGUF format, {threads} threads, "
           f"decode timed by {DECODE_LOOP}, best of interleaved rounds, relative least squares t = "
           "weights/rate[format] + per_layer*blocks + attention values/attention rate + "
           f"per_token (fit residual {fit.residual_pct:.1f}%)")
    runtime = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) CPU, {threads} threads"
    return _fitted_profile(profile, fit, prefill, how, runtime,
                           "derived: llama.cpp's CPU backend has kernels for every GGUF format")


def _fitted_profile(profile: DeviceProfile, fit: Fit, prefill: list[float], how: str,
                    runtime: str, fast_formats_source: str) -> DeviceProfile:
    """`profile` with a calibration fit's rates and overheads, each sourced to `how`."""
    from llmpareto.formats import get_format

    rates = {f: 1.0 / s for f, s in fit.seconds_per_weight.items() if s > 0}
    attention = 1.0 / fit.per_attention_value_s if fit.per_attention_value_s > 0 else 0.0
    # DRAM side: the fastest bytes/s any kernel reached; slower formats are kernel-bound
    best_Bps = max(get_format(f).bits_per_weight / 8 * r for f, r in rates.items())
    eta_mem = float(np.clip(best_Bps / profile.bandwidth_Bps, 0.01, 1.0))
    eta_compute = float(np.clip(np.median(prefill), 0.01, 1.0))
    sources = {**profile.sources,
               "eta_mem": f"{how}; fastest kernel's bytes/s over bandwidth_Bps",
               "overhead_s_per_token": f"{how}; per_token", "overhead_s_per_layer":
               f"{how}; per_layer", "fast_formats": fast_formats_source,
               "attention_values_per_s": f"{how}; attention rate",
               "eta_compute": f"{how}; median ideal roofline prefill time / measured "
               f"({PROMPT} tokens)"}
    sources = {k: v for k, v in sources.items() if not k.startswith("kernel_weights_per_s.")}
    sources.update({f"kernel_weights_per_s.{f}": f"{how}; rate[{f}]" for f in rates})
    return dataclasses.replace(
        profile, runtime=runtime, eta_mem=eta_mem, eta_compute=eta_compute,
        overhead_s_per_token=fit.per_token_s, overhead_s_per_layer=fit.per_layer_s,
        kernel_weights_per_s=rates, attention_values_per_s=attention, sources=sources)


GPU_FORMATS = tuple(f for f in SIMPLE_FORMATS if f != "tq2_0")  # ggml-cuda has no ternary kernel


def calibrate_llamacpp_gpu(base: DeviceProfile, shapes=GPU_CALIBRATION, rounds: int = 2,
                           log=print) -> DeviceProfile:
    """`base` (the GPU's own profile: bandwidth, memory, peaks, power) with llama.cpp's
    measured decode rates on this GPU, every block offloaded. Each calibration file is a
    timing GGUF (a repeated pattern, `timing_gguf`), written, timed and deleted in turn, so a
    few GB of disk suffice."""
    import llama_cpp

    from llmpareto.errors import UserError
    from llmpareto.evaluators.llamacpp import DECODE_LOOP, gguf_speeds
    from llmpareto.evaluators.timing_gguf import write_timing_gguf
    from llmpareto.recipe import Recipe
    from llmpareto.shapes import Shape

    if not llama_cpp.llama_supports_gpu_offload():
        raise UserError("--gpu: this llama-cpp-python was built without GPU offload; reinstall "
                        "it with CMAKE_ARGS='-DGGML_CUDA=on -DGGML_OPENMP=OFF' pip install "
                        "--force-reinstall --no-binary llama-cpp-python llama-cpp-python")
    profile = dataclasses.replace(base, fast_formats=GPU_FORMATS)
    rows, prefill = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, ffn, blocks, heads, kv, vocab, tied, hd in shapes:
            shape = Shape(hidden, ffn, blocks, heads, kv, vocab, tied, hd)
            arch = shape.arch()
            for fmt in GPU_FORMATS:
                formats = arch.formats_for(Recipe.uniform(fmt))
                path = write_timing_gguf(Path(tmp) / "cal.gguf", shape, formats)
                m = gguf_speeds([str(path)], prompt_tokens=PROMPT, decode_tokens=48,
                                contexts=CONTEXTS, rounds=rounds, gpu_layers=-1)[0]
                path.unlink()
                rows += [{"arch": arch, "formats": formats, "context": c,
                          "seconds": m[f"measured_latency_ms@{c}"] / 1e3} for c in CONTEXTS]
                prefill.append(_prefill_ideal_s(arch, formats, profile)
                               / (PROMPT / m["measured_prompt_tokens_per_s"]))
                log(f"calibration {shape.n_weights / 1e9:.2f}B weights {fmt}: "
                    f"{m[f'measured_latency_ms@{CONTEXTS[0]}']:.3f} ms/token at KV {CONTEXTS[0]}")
    fit = _fit(rows)
    how = (f"derived: measured {time.strftime('%Y-%m-%d')} with llama-cpp-python "
           f"{llama_cpp.__version__} (CUDA, all blocks offloaded): decode at KV lengths "
           f"{CONTEXTS} of timing GGUFs of shapes (hidden, ffn, blocks, heads, KV heads, "
           f"vocab, tied, head dim) {shapes} in {', '.join(GPU_FORMATS)}, decode timed by "
           f"{DECODE_LOOP}, best of {rounds} "
           f"rounds, relative least squares t = weights/rate[format] + per_layer*blocks + "
           f"attention values/attention rate + per_token (fit residual "
           f"{fit.residual_pct:.1f}%)")
    runtime = (f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) CUDA, all blocks "
               "offloaded")
    return _fitted_profile(profile, fit, prefill, how, runtime, "derived: ggml-cuda has "
                           "decode kernels for these formats; tq2_0 has none, so llama.cpp runs "
                           "those tensors on the CPU (a SmolLM2 recipe with tq2_0 embeddings "
                           "decoded at 22-30 ms/token instead of 1.5 on an H100); the cost "
                           "model costs them as f16 on the GPU, an underestimate")
