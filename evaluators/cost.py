"""Analytic cost evaluators (memory, latency, energy): no model weights, microseconds a call.

Roofline per op and phase: t = max(flops / (peak[dtype] * eta_compute),
bytes / (bandwidth * eta_mem)); every constant comes from the DeviceProfile. A weight format
the device has no kernel for is costed as dequantized to f16 (2 bytes a weight, f16 math).

Sparsity saves only where the profile's runtime runs the pattern on that format
(`sparse_kernels`): the tensor is then stored as its kept values plus index metadata, and its
matmul takes the dense time divided by the profile's cited speed-up. Everywhere else a pruned
tensor is stored and read as the dense one (zeros included), and costs exactly the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from llmpareto.arch import Arch, Tensor2D
from llmpareto.budget import Workload
from llmpareto.device_profiles.schema import DeviceProfile, SparseKernel
from llmpareto.evaluators.base import Candidate
from llmpareto.formats import get_format
from llmpareto.recipe import parse_pattern

Sparsity = dict[str, tuple[str, float]]  # fqn -> (pattern, level), Arch.sparsity_for

KV_BYTES_PER_VALUE = 2  # f16 KV cache, as llama.cpp and transformers keep it by default
ACT_BYTES = 4  # f32 activations between ops (llama.cpp and torch on CPU)


def weight_bytes(t: Tensor2D, fmt: str | None, arch: Arch) -> int:
    """Stored bytes of one tensor: its format's exact size, or the source dtype's."""
    if fmt is None:
        return int(t.numel * arch.source_bytes_per_weight)
    return get_format(fmt).nbytes(t.rows, t.cols)


def sparse_kernel(t: Tensor2D, fmt: str | None, sparsity: tuple[str, float] | None,
                  p: DeviceProfile | None) -> SparseKernel | None:
    """The profile's kernel for this tensor's pattern, stored format and size, or None: the
    tensor is stored and run dense."""
    if p is None or sparsity is None or fmt is None:
        return None
    k = p.sparse_kernels.get(sparsity[0])
    return k if k is not None and fmt in k.formats and t.numel >= k.min_weights else None


def sparse_weight_bytes(t: Tensor2D, fmt: str, pattern: str) -> int:
    """N:M storage: the kept N/M of each row in `fmt`, plus ceil(log2 M) index bits per kept
    value (2:4 in f16: 16 + 2 bits per kept weight = 9 bits a weight, as cuSPARSELt, CUTLASS
    and compressed-tensors' sparse-24-bitmask store it)."""
    n, m = parse_pattern(pattern)
    kept = t.rows * (t.cols // m) * n
    return get_format(fmt).nbytes(t.rows, t.cols // m * n) + -(-kept * (m - 1).bit_length() // 8)


def stored_bytes(t: Tensor2D, fmt: str | None, arch: Arch,
                 sparsity: tuple[str, float] | None = None, p: DeviceProfile | None = None) -> int:
    """Bytes of one tensor as the profile's runtime stores it: sparse where it can be."""
    if sparse_kernel(t, fmt, sparsity, p) is not None:
        return sparse_weight_bytes(t, fmt, sparsity[0])
    return weight_bytes(t, fmt, arch)


def weights_bytes(arch: Arch, formats: dict[str, str | None], sparsity: Sparsity | None = None,
                  p: DeviceProfile | None = None) -> int:
    """All weights: searched tensors at their formats (sparse where the profile's runtime
    stores them so), norms and biases in f32."""
    sp = sparsity or {}
    return sum(stored_bytes(t, formats.get(t.fqn), arch, sp.get(t.fqn), p)
               for t in arch.tensors) + 4 * arch.other_params


def nonzero_params(arch: Arch, sparsity: Sparsity | None = None) -> int:
    """Weights of the searched tensors left after pruning (exact: unstructured pruning removes
    round(level x numel) of a module, N:M removes (M-N)/M of it)."""
    sp = sparsity or {}
    total = 0
    for t in arch.tensors:
        pattern, level = sp.get(t.fqn, ("unstructured", 0.0))
        nm = parse_pattern(pattern)
        total += t.numel * nm[0] // nm[1] if nm else t.numel - round(level * t.numel)
    return total


def scale_overhead_bytes(arch: Arch, formats: dict[str, str | None]) -> int:
    """How much of weights_bytes is block scales and minimums rather than weight codes."""
    return sum(get_format(f).scale_bytes(t.rows, t.cols)
               for t in arch.tensors if (f := formats.get(t.fqn)) is not None)


def kv_cache_bytes(arch: Arch, context: int, batch: int = 1,
                   bytes_per_value: int = KV_BYTES_PER_VALUE) -> int:
    """K and V for every layer and KV head: 2 * layers * kv_heads * head_dim * bytes * context,
    each block with its own KV heads (a per-block student) and, for a sliding-window layer of a
    family llama.cpp runs so, min(context, window) tokens."""
    return 2 * arch.kv_head_tokens(context) * arch.head_dim * bytes_per_value * batch


def activation_bytes(arch: Arch, w: Workload) -> int:
    """Largest live f32 buffers of a prefill step: the MLP (or QKV) intermediate of every prompt
    token, the attention scores of every head over the context, and one row of logits."""
    widest = max([3 * arch.hidden_size] + [max(t.rows, t.cols) for t in arch.linears])
    heads = arch.n_heads or arch.n_kv_heads  # the widest block's
    per_seq = w.prompt_tokens * widest + heads * w.prompt_tokens * w.context + arch.vocab_size
    return ACT_BYTES * w.batch * per_seq


@dataclass
class OpCost:
    kind: str  # projection kind (self_attn.q_proj, ...), attention, lm_head, embed, norms
    phase: str  # decode (one token) or prefill (the whole prompt)
    bytes: float
    flops: float
    seconds: float
    bound: str  # memory | compute


def roofline(bytes_: float, flops: float, dtype: str, p: DeviceProfile) -> tuple[float, str]:
    t_mem = bytes_ / (p.bandwidth_Bps * p.eta_mem)
    t_cmp = flops / (p.peak(dtype) * p.eta_compute)
    return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")


def _kernel(fmt: str | None, arch: Arch, p: DeviceProfile) -> tuple[str | None, str]:
    """(format the device really reads, dtype its math runs in)."""
    if fmt is None:
        return None, "f32" if arch.source_bytes_per_weight >= 4 else "f16"
    if fmt in p.fast_formats:
        return fmt, get_format(fmt).compute_dtype
    return "f16", "f16"  # no native kernel: dequantize to f16


def _matmul(kind: str, phase: str, t: Tensor2D, fmt: str | None, tokens: int, arch: Arch,
            p: DeviceProfile, sparsity: tuple[str, float] | None = None) -> OpCost:
    read_fmt, dtype = _kernel(fmt, arch, p)
    act = ACT_BYTES * tokens * (t.rows + t.cols)
    b = weight_bytes(t, read_fmt, arch) + act
    f = 2.0 * t.numel * tokens
    sec, bound = roofline(b, f, dtype, p)
    rate = p.kernel_weights_per_s.get(read_fmt or "")
    if rate and phase == "decode" and t.numel * tokens / rate > sec:
        sec, bound = t.numel * tokens / rate, "compute"  # the kernel's unpacking, not DRAM
    kernel = sparse_kernel(t, read_fmt, sparsity, p)
    if kernel is not None:  # the runtime's sparse kernel: its bytes, its measured speed-up
        n, m = parse_pattern(sparsity[0])
        b = sparse_weight_bytes(t, read_fmt, sparsity[0]) + act
        f *= n / m
        sec /= kernel.decode_speedup if phase == "decode" else kernel.prefill_speedup
    return OpCost(kind, phase, b, f, sec, bound)


def op_costs(arch: Arch, formats: dict[str, str | None], p: DeviceProfile,
             w: Workload, sparsity: Sparsity | None = None) -> list[OpCost]:
    """Every op of one decoded token (at context w.context) and of the prefill of the prompt."""
    ops: list[OpCost] = []
    sp = sparsity or {}
    head = arch.lm_head or arch.embedding
    emb_fmt = formats.get(arch.embedding.fqn)
    emb_row = weight_bytes(arch.embedding, emb_fmt, arch) / max(arch.embedding.rows, 1)
    for phase, tokens in (("decode", w.batch), ("prefill", w.batch * w.prompt_tokens)):
        for t in arch.linears:
            ops.append(_matmul(t.kind, phase, t, formats.get(t.fqn), tokens, arch, p,
                               sp.get(t.fqn)))
        # attention: decode reads the whole KV cache and writes one row; prefill writes the
        # prompt's rows and reads them back once, with causal (half) score math
        kv_row = arch.kv_heads_total * 2 * arch.head_dim * KV_BYTES_PER_VALUE
        q_per_kv = arch.q_per_kv
        if phase == "decode":
            held = arch.kv_head_tokens(w.context + 1)  # KV-head-tokens read (sliding: a window)
            b = 2 * arch.head_dim * KV_BYTES_PER_VALUE * held * w.batch
            f = 4.0 * q_per_kv * arch.head_dim * arch.kv_head_tokens(w.context) * w.batch
            sec, bound = roofline(b, f, "f16", p)
            # measured: a CPU runtime's scores, softmax and sums over the cache, per K value
            kv_values = arch.kv_head_tokens(w.context) * arch.head_dim * w.batch
            rate = p.attention_values_per_s
            if rate and kv_values / rate > sec:
                sec, bound = kv_values / rate, "compute"
        else:
            b = 2.0 * kv_row * w.prompt_tokens * w.batch
            f = arch.kv_heads_total * 4.0 * q_per_kv * arch.head_dim * w.batch * \
                w.prompt_tokens * (w.prompt_tokens + 1) / 2
            sec, bound = roofline(b, f, "f16", p)
        ops.append(OpCost("attention", phase, b, f, sec, bound))
        # logits for the last position only (llama.cpp's default in prefill too)
        ops.append(_matmul("lm_head", phase, head, formats.get(head.fqn), w.batch, arch, p))
        b = emb_row * tokens + 4.0 * arch.other_params
        ops.append(OpCost("embed+norms", phase, b, 0.0, *roofline(b, 0.0, "f32", p)))
    return ops


def summarize(ops: list[OpCost], arch: Arch, p: DeviceProfile, w: Workload) -> dict[str, float]:
    dec = [o for o in ops if o.phase == "decode"]
    pre = [o for o in ops if o.phase == "prefill"]
    fixed_s = p.overhead_s_per_token + p.overhead_s_per_layer * arch.n_layers
    decode_s = sum(o.seconds for o in dec) + fixed_s
    prefill_s = sum(o.seconds for o in pre) + fixed_s
    pj = sum(o.bytes for o in dec) * p.energy_pj_per_byte + sum(o.flops for o in dec) * \
        p.energy_pj_per_flop
    energy_j = pj * 1e-12 + p.power_idle_w * decode_s  # per decode step (w.batch tokens)
    return {
        "latency_ms": 1e3 * decode_s,
        "decode_tokens_per_s": w.batch / decode_s,
        "prefill_ms": 1e3 * prefill_s,
        "energy_mj": 1e3 * energy_j / w.batch,
        "decode_bytes": float(sum(o.bytes for o in dec)),
        "decode_flops": float(sum(o.flops for o in dec)),
    }


@dataclass
class MemoryEvaluator:
    arch: Arch
    workload: Workload = field(default_factory=Workload)
    profile: DeviceProfile | None = None  # when set, also says whether it fits

    metrics: ClassVar[tuple[str, ...]] = ("memory_bytes", "weights_bytes", "kv_cache_bytes",
                                          "activation_bytes", "scale_overhead_bytes",
                                          "nonzero_params")
    needs_model: ClassVar[bool] = False

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        arch = self.arch.restructure(candidate.recipe.structure)
        sparsity = self.arch.sparsity_for(candidate.recipe)
        w = weights_bytes(arch, candidate.formats, sparsity, self.profile)
        kv = kv_cache_bytes(arch, self.workload.context, self.workload.batch)
        act = activation_bytes(arch, self.workload)
        out = {"memory_bytes": float(w + kv + act), "weights_bytes": float(w),
               "kv_cache_bytes": float(kv), "activation_bytes": float(act),
               "scale_overhead_bytes": float(scale_overhead_bytes(arch, candidate.formats)),
               "nonzero_params": float(nonzero_params(arch, sparsity))}
        if self.profile is not None:
            out["fits_memory"] = float(w + kv + act <= self.profile.memory_bytes)
        return out


@dataclass
class LatencyEnergyEvaluator:
    arch: Arch
    profile: DeviceProfile
    workload: Workload = field(default_factory=Workload)

    metrics: ClassVar[tuple[str, ...]] = ("latency_ms", "decode_tokens_per_s", "prefill_ms",
                                          "energy_mj")
    needs_model: ClassVar[bool] = False

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        arch = self.arch.restructure(candidate.recipe.structure)
        ops = op_costs(arch, candidate.formats, self.profile, self.workload,
                       self.arch.sparsity_for(candidate.recipe))
        s = summarize(ops, arch, self.profile, self.workload)
        return {k: s[k] for k in self.metrics}


def breakdown(arch: Arch, formats: dict[str, str | None], p: DeviceProfile,
              w: Workload, sparsity: Sparsity | None = None) -> list[dict]:
    """Per (phase, kind) totals for `llmpareto cost`: bytes, FLOPs, seconds, bound."""
    rows: dict[tuple[str, str], dict] = {}
    for o in op_costs(arch, formats, p, w, sparsity):
        r = rows.setdefault((o.phase, o.kind), {"phase": o.phase, "kind": o.kind, "bytes": 0.0,
                                                "flops": 0.0, "time_ms": 0.0, "memory_ms": 0.0})
        r["bytes"] += o.bytes
        r["flops"] += o.flops
        r["time_ms"] += 1e3 * o.seconds
        r["memory_ms"] += 1e3 * o.seconds if o.bound == "memory" else 0.0
    for r in rows.values():
        r["bound"] = "memory" if r["memory_ms"] >= r["time_ms"] / 2 else "compute"
        r["energy_mj"] = 1e3 * 1e-12 * (r["bytes"] * p.energy_pj_per_byte
                                        + r["flops"] * p.energy_pj_per_flop)
        del r["memory_ms"]
    return list(rows.values())


__all__ = [
    "LatencyEnergyEvaluator",
    "MemoryEvaluator",
    "OpCost",
    "Workload",
    "activation_bytes",
    "breakdown",
    "kv_cache_bytes",
    "nonzero_params",
    "op_costs",
    "roofline",
    "sparse_weight_bytes",
    "stored_bytes",
    "summarize",
    "weights_bytes",
]


def cost_report(model: str = "smollm2-135m", device: str = "raspberry-pi-5",
                recipe: str | None = None, format: str | None = None, context: int = 2048,
                prompt_tokens: int = 128, batch: int = 1) -> dict:
    """`llmpareto cost`: one recipe (a recipe JSON path, or a uniform `format`, default f16)
    of `model` on `device`: totals (latency_ms, energy_mj, memory_bytes, ...) and the
    per-layer-kind breakdown. Reads configs as numbers: no torch."""
    from llmpareto.errors import UserError
    from llmpareto.evaluators.host import load_device
    from llmpareto.models import load_arch
    from llmpareto.recipe import Recipe

    if recipe and format:
        raise UserError("give --recipe or --format, not both")
    r = Recipe.load(recipe) if recipe else Recipe.uniform(format or "f16")
    arch = load_arch(model)
    profile = load_device(device)
    w = Workload(prompt_tokens=prompt_tokens, batch=batch, context=context)
    formats, sparsity = arch.formats_for(r), arch.sparsity_for(r)
    mem = MemoryEvaluator(arch, w, profile).evaluate(Candidate(r, formats))
    totals = summarize(op_costs(arch, formats, profile, w, sparsity), arch, profile, w)
    totals.update(mem)
    return {"model": model, "device": profile.name, "runtime": profile.runtime,
            "memory_limit_bytes": profile.memory_bytes, "workload": vars(w), "totals": totals,
            "breakdown": breakdown(arch, formats, profile, w, sparsity)}
