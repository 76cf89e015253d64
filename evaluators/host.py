"""Measure this machine as a DeviceProfile (`--device host`): memory bandwidth, GEMV and matmul
efficiency in torch on the CPU, and the fixed per-token and per-layer cost of eager decode.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llmpareto.device_profiles.schema import DeviceProfile, profile_from_dict
from llmpareto.errors import UserError

if TYPE_CHECKING:
    import torch

MiB = 2**20
RUNTIMES = ("torch", "llamacpp")
# A dtype whose 256^3 matmul runs this many times below the f32 peak is emulated in scalar code;
# no runtime would choose it, so it gets no peak_flops entry (cost.py then falls back).
SLOW_DTYPE_FACTOR = 10.0
# Decode GEMVs read weights in the layouts of a small LLM's MLP block (the default model's
# 576 -> 1536 -> 576): on CPUs the GEMV rate depends on in_features, so shapes matter.
GEMV_SHAPES = ((1536, 576), (1536, 576), (576, 1536))  # (out_features, in_features)
PREFILL_TOKENS = 128
# Tiny random Llama blocks: their weights sit in cache, so a decode step costs almost only
# the Python and dispatch work that the per-token and per-layer overheads stand for.
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 1024}
FIT_CONTEXT = 128  # KV positions held while timing the tiny models' decode steps
WATTS_PER_THREAD = 4.0  # codecarbon's DEFAULT_POWER_PER_CORE, used if codecarbon is missing
BUSY_WARN = 0.1  # CPU share taken by other processes above which the timings are suspect
IDLE_FRACTION = 0.1  # codecarbon's CPU load model: power = TDP * (0.1 + 0.9 * load**3)


@dataclasses.dataclass(frozen=True)
class _Plan:
    stream_bytes: int  # buffer streamed for bandwidth; far larger than any L3
    gemv_bytes: int  # total weights cycled through in the GEMV test
    repeats: int
    square_n: tuple[int, ...]  # square matmul sizes for peak FLOP/s
    layer_counts: tuple[int, ...]  # tiny models' depths for the overhead fit
    decode_steps: int  # timed per depth, over all rounds
    fit_rounds: int


FULL = _Plan(512 * MiB, 256 * MiB, 9, (1024, 2048), (1, 2, 4, 8, 16), 150, 5)
QUICK = _Plan(128 * MiB, 128 * MiB, 3, (1024,), (1, 8), 40, 2)


def _times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` untimed ones (caches, thread pools)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def stream_bandwidth(nbytes: int, repeats: int) -> float:
    """Best-of-N read bandwidth (B/s): a reduction over an f32 buffer much larger than caches."""
    import torch

    x = torch.ones(nbytes // 4)
    return nbytes / min(_times(x.sum, repeats))


def gemv_bandwidth(total_bytes: int, repeats: int) -> float:
    """Weight bytes per second of f32 F.linear on one token, cycling through distinct matrices
    (GEMV_SHAPES) so that every pass streams `total_bytes` from memory, as decode does."""
    import torch
    import torch.nn.functional as F

    per_set = sum(4 * o * i for o, i in GEMV_SHAPES)
    weights = [torch.full((o, i), 0.01) for _ in range(max(1, total_bytes // per_set))
               for o, i in GEMV_SHAPES]
    xs = {i: torch.full((1, 1, i), 0.5) for _, i in GEMV_SHAPES}

    def run() -> None:
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    with torch.inference_mode():
        best = min(_times(run, repeats))
    return sum(4 * w.numel() for w in weights) / best


def matmul_flops(dtype: str, n: int, repeats: int) -> float:
    """Best-of-N FLOP/s of an n x n x n matmul in `dtype` (f32, bf16 or f16)."""
    import torch

    dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    a, b = torch.full((n, n), 0.5, dtype=dt), torch.full((n, n), 0.25, dtype=dt)
    return 2.0 * n**3 / min(_times(lambda: a @ b, repeats))


def prefill_flops(repeats: int) -> float:
    """FLOP/s of f32 F.linear on PREFILL_TOKENS tokens with GEMV_SHAPES weights (prefill)."""
    import torch
    import torch.nn.functional as F

    pairs = [(torch.full((1, PREFILL_TOKENS, i), 0.5), torch.full((o, i), 0.01))
             for o, i in GEMV_SHAPES]
    flops = sum(2.0 * PREFILL_TOKENS * w.numel() for _, w in pairs)
    with torch.inference_mode():
        best = min(_times(lambda: [F.linear(x, w) for x, w in pairs], repeats, warmup=2))
    return flops / best


def _peak_flops(plan: _Plan) -> tuple[dict[str, float], dict[str, str]]:
    """f32 always; bf16/f16 only where this torch build runs them at a usable speed."""
    peaks = {"f32": max(matmul_flops("f32", n, plan.repeats) for n in plan.square_n)}
    notes = {"f32": f"best of {plan.repeats} square f32 matmuls, n in {list(plan.square_n)}"}
    for dtype in ("bf16", "f16"):
        try:
            probe = matmul_flops(dtype, 256, 2)
        except RuntimeError as exc:  # dtype not implemented for CPU matmul in this build
            logging.getLogger(__name__).info("host profile: no %s matmul (%s)", dtype, exc)
            continue
        if probe * SLOW_DTYPE_FACTOR < peaks["f32"]:
            continue  # emulated: e.g. f16 without AVX512-FP16 runs at ~1% of f32
        peaks[dtype] = max(matmul_flops(dtype, n, plan.repeats) for n in plan.square_n)
        notes[dtype] = f"best of {plan.repeats} square {dtype} matmuls, n in {list(plan.square_n)}"
    return peaks, notes


def time_decode_steps(model: torch.nn.Module, context: int, steps: int) -> list[float]:
    """Wall seconds of single-token decode steps (KV cache, eager) with exactly `context` KV
    positions before each step: the cache is cropped back after every step, untimed."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), generator=gen)
    out: list[float] = []
    # transformers renamed past_key_values to cache (5.2x; the old name goes in 5.40)
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        cache = getattr(model(input_ids=ids[:, :context], use_cache=True), kv)
        step = ids[:, context:]
        for i in range(steps + 2):
            t0 = time.perf_counter()
            model(input_ids=step, use_cache=True, **{kv: cache})
            if i >= 2:  # the first steps warm allocator and thread pool
                out.append(time.perf_counter() - t0)
            cache.crop(-1)  # back to `context` positions
    return out


def _tiny_llama(n_layers: int) -> torch.nn.Module:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_LLAMA, num_hidden_layers=n_layers)
    return LlamaForCausalLM(cfg).eval()


def _fit_overheads(plan: _Plan, base: DeviceProfile) -> tuple[float, float, str]:
    """(s per token, s per layer): decode step time of tiny models minus their roofline time,
    fitted by least squares as a + b * layers (both clamped at 0)."""
    from llmpareto.arch import Arch
    from llmpareto.budget import Workload
    from llmpareto.evaluators.cost import op_costs, summarize

    work = Workload(prompt_tokens=FIT_CONTEXT, context=FIT_CONTEXT)
    models = {n: _tiny_llama(n) for n in plan.layer_counts}
    rounds: dict[int, list[float]] = {n: [] for n in models}
    for _ in range(plan.fit_rounds):  # interleaved, so a burst of load hits every depth alike
        for n, model in models.items():
            steps = time_decode_steps(model, FIT_CONTEXT, plan.decode_steps // plan.fit_rounds)
            rounds[n].append(statistics.median(steps))
    xs, ys = [], []
    for n, model in models.items():
        arch = Arch.from_model(model)
        fmts = {t.fqn: None for t in arch.tensors}
        roof_s = summarize(op_costs(arch, fmts, base, work), arch, base, work)["latency_ms"] / 1e3
        xs.append(n)
        ys.append(min(rounds[n]) - roof_s)  # the least disturbed round (shared machines)
    per_layer, per_token = _line(xs, ys)
    pts = ", ".join(f"{n} layers {1e3 * y:.3f} ms" for n, y in zip(xs, ys))
    note = (f"single-token decode step (KV cache {FIT_CONTEXT} positions; best of "
            f"{plan.fit_rounds} interleaved rounds of the median of "
            f"{plan.decode_steps // plan.fit_rounds} steps) of tiny random LlamaForCausalLM "
            f"({_tiny_desc()}) minus its roofline time: {pts}; least-squares fit a + b * layers")
    return per_token, per_layer, note


def _tiny_desc() -> str:
    return ", ".join(f"{k}={v}" for k, v in TINY_LLAMA.items()
                     if k in ("hidden_size", "intermediate_size", "vocab_size"))


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y over x, both kept >= 0 (a cost is never negative)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    intercept = my - slope * mx
    if slope < 0:
        return 0.0, max(my, 0.0)
    if intercept < 0:  # refit through the origin
        return max(sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0), 0.0
    return slope, intercept


def memory_bytes() -> tuple[int, str]:
    """RAM this process may use: MemTotal, or a smaller cgroup limit (containers)."""
    total, how = 0, ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total, how = int(line.split()[1]) * 1024, "MemTotal in /proc/meminfo"
    except OSError:
        pass
    if not total:
        import psutil

        total, how = int(psutil.virtual_memory().total), "psutil.virtual_memory().total"
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and 0 < int(limit) < total:
            total, how = int(limit), f"cgroup limit {limit_file} (below MemTotal)"
    return total, how


def cpu_power_w() -> tuple[float, str]:
    """Package power estimate: codecarbon's offline TDP table lookup (no network)."""
    threads = os.cpu_count() or 1
    try:
        from codecarbon.core.cpu import TDP

        cc_log = logging.getLogger("codecarbon")
        level, _ = cc_log.level, cc_log.setLevel(logging.ERROR)  # its "unknown CPU" warnings
        try:
            tdp = TDP()
        finally:
            cc_log.setLevel(level)
        if tdp.tdp:
            return float(tdp.tdp), (f"codecarbon {_version('codecarbon')} TDP lookup "
                                    f"(offline table) for CPU '{tdp.model}': {tdp.tdp} W, which "
                                    "is codecarbon's 4 W per thread when the model is not in "
                                    "its table")
    except Exception as exc:  # noqa: BLE001 - codecarbon missing or failing: fall back
        logging.getLogger(__name__).info("host profile: codecarbon TDP lookup failed (%s)", exc)
    return WATTS_PER_THREAD * threads, (f"{WATTS_PER_THREAD} W per thread x {threads} threads "
                                        "(codecarbon's default for unknown CPUs)")


def other_cpu_meter() -> Callable[[], float | None]:
    """Start a meter; calling it gives the share of all CPUs that other processes used since
    (from /proc/stat, minus this process's CPU time), or None where that cannot be read."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample() -> tuple[float, float, float]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(values) - values[3] - values[4]  # minus idle and iowait
        return sum(values) / hz, busy / hz, time.process_time()

    try:
        start = sample()
    except (OSError, ValueError, IndexError):
        return lambda: None

    def other() -> float | None:
        total, busy, own = (b - a for a, b in zip(start, sample()))
        return min(max((busy - own) / total, 0.0), 1.0) if total > 0 else None

    return other


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _estimate_sources(mem_how: str, power_how: str, gemv_Bps: float, prefill_flops_s: float,
                      today: str) -> dict[str, str]:
    """Sources of the fields that are read or estimated rather than timed."""
    upper = "(device-level upper bound)"
    return {
        "memory_bytes": f"derived: {mem_how}, read on {today}",
        "fast_formats": "derived: torch has no kernels for GGUF block formats; quantized "
                        "weights are dequantized before the matmul, so none are fast",
        "sparse": "derived: torch CPU dense matmuls skip no zeros; no structured sparsity",
        "power_active_w": f"derived: estimate, the true power of this host is not measurable "
                          f"here; {power_how}",
        "power_idle_w": f"derived: estimate, {IDLE_FRACTION} x power_active_w, the idle floor "
                        "of codecarbon's CPU load model (TDP * (0.1 + 0.9 * load^3))",
        "energy_pj_per_byte": "derived: estimate, (power_active_w - power_idle_w) / achieved "
                              f"decode GEMV rate {gemv_Bps / 1e9:.1f} GB/s {upper}",
        "energy_pj_per_flop": "derived: estimate, (power_active_w - power_idle_w) / achieved "
                              f"prefill rate {prefill_flops_s / 1e9:.1f} GFLOP/s {upper}",
    }


def _base_profile(plan: _Plan, today: str) -> DeviceProfile:
    """Everything but the fixed overheads (fitted afterwards against this profile's roofline)."""
    import torch

    stream = stream_bandwidth(plan.stream_bytes, plan.repeats)
    gemv = gemv_bandwidth(plan.gemv_bytes, plan.repeats)
    peaks, peak_notes = _peak_flops(plan)
    prefill = prefill_flops(plan.repeats)
    # a rate above the "peak" only means the peak test was the slower one: take the best seen
    bandwidth, peaks["f32"] = max(stream, gemv), max(peaks["f32"], prefill)
    mem, mem_how = memory_bytes()
    power, power_how = cpu_power_w()
    idle = IDLE_FRACTION * power
    threads = torch.get_num_threads()
    shapes = ", ".join(f"{o}x{i}" for o, i in GEMV_SHAPES)
    m = f"derived: measured on {today} with torch {torch.__version__} ({threads} threads):"
    sources = {
        "bandwidth_Bps": f"{m} best of {plan.repeats} reductions (sum) over a "
                         f"{plan.stream_bytes // MiB} MiB f32 buffer = {stream / 1e9:.1f} GB/s"
                         + (" (the GEMV test was faster and is used)" if gemv > stream else ""),
        "eta_mem": f"{m} f32 F.linear on one token (decode GEMV) cycling through "
                   f"{plan.gemv_bytes // MiB} MiB of distinct [{shapes}] weights (out x in), "
                   f"best of {plan.repeats}: {gemv / 1e9:.1f} GB/s / bandwidth_Bps",
        "eta_compute": f"{m} f32 F.linear on {PREFILL_TOKENS} tokens with [{shapes}] weights "
                       f"(prefill), best of {plan.repeats}: {prefill / 1e9:.1f} GFLOP/s / "
                       "peak_flops.f32",
    }
    sources.update({f"peak_flops.{k}": f"{m} {v}" for k, v in peak_notes.items()})
    sources.update(_estimate_sources(mem_how, power_how, gemv, prefill, today))
    if prefill >= peaks["f32"]:
        sources["peak_flops.f32"] += "; the prefill-shape matmul was faster and is used"
    profile = DeviceProfile(
        name="host", description=f"this machine: {_cpu_name()}, {os.cpu_count()} CPUs, "
                                 f"{mem / 2**30:.1f} GiB, measured on {today}",
        runtime=f"torch {torch.__version__} CPU, {threads} threads (transformers eager)",
        memory_bytes=mem, bandwidth_Bps=bandwidth, eta_mem=gemv / bandwidth,
        eta_compute=prefill / peaks["f32"], overhead_s_per_token=0.0, fast_formats=(),
        sparse=(), power_active_w=power, power_idle_w=idle,
        energy_pj_per_byte=1e12 * (power - idle) / gemv,
        energy_pj_per_flop=1e12 * (power - idle) / prefill, peak_flops=peaks, sources=sources)
    return profile


def measure_host_profile(runtime: str = "torch", quick: bool = False,
                         threads: int | None = None, like=None) -> DeviceProfile:
    """Measure this machine (about a minute; `quick`: a few seconds, coarser) as a profile for
    the given runtime. Thread settings are left as torch has them: they are part of the host;
    `threads` and `like` (an Arch) go to the llama.cpp calibration (`calibrate_llamacpp`)."""
    if runtime not in RUNTIMES:
        raise UserError(f"cannot measure a host profile for runtime {runtime!r}; supported: "
                        f"{', '.join(RUNTIMES)}. For another runtime write a profile TOML by hand "
                        "(see the shipped ones in llmpareto/device_profiles/)")
    plan = QUICK if quick else FULL
    today = datetime.date.today().isoformat()
    meter = other_cpu_meter()
    base = _base_profile(plan, today)
    per_token, per_layer, note = _fit_overheads(plan, base)
    fit = f"derived: measured on {today}: {note}"
    sources = {**base.sources, "overhead_s_per_token": f"{fit}; intercept a",
               "overhead_s_per_layer": f"{fit}; slope b"}
    data = dataclasses.replace(base, overhead_s_per_token=per_token,
                               overhead_s_per_layer=per_layer, sources=sources).to_dict()
    busy = meter()
    if busy is not None:
        data["description"] += f"; other processes used {100 * busy:.0f}% of the CPUs meanwhile"
    if busy is not None and busy > BUSY_WARN:
        # timings under load are slower than the machine is, and threads wait on each other
        logging.getLogger(__name__).warning(
            "other processes used %.0f%% of the CPUs while the host profile was measured, so "
            "it is slower than this machine is when idle. Measure again when it is idle (delete "
            "the cached profile: $LLMPARETO_HOST_PROFILE or ~/.cache/llmpareto/host.toml)",
            100 * busy)
    profile = profile_from_dict(data, "host (measured)")
    if runtime == "llamacpp":  # same machine numbers, llama.cpp's own efficiencies and kernels
        from llmpareto.evaluators.host_llamacpp import calibrate_llamacpp

        profile = calibrate_llamacpp(profile, quick=quick, threads=threads, like=like)
    return profile


def load_device(spec: str | Path) -> DeviceProfile:
    """`--device SPEC` as a search or `cost` reads it: a profile, or `host` measured here on
    first use (then cached)."""
    from llmpareto.device_profiles.loader import load_profile

    return load_profile(spec, measure_host=measure_host_profile)
