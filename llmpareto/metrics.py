"""The table of metrics: every name a run records, its unit and whether a model is needed to
measure it (evaluators make them; settings, fronts and reports read them)."""

from __future__ import annotations

from dataclasses import dataclass

from llmpareto.errors import UserError


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    needs_model: bool


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("perplexity", "perplexity on the evaluation windows (lower is better)", True),
        Metric("kl_nats", "mean KL(base || candidate) per token on the evaluation windows, nats", True),
        Metric("memory_bytes", "weights + KV cache at --context, bytes", False),
        Metric("weights_bytes", "weights at their formats' exact bits per weight, bytes", False),
        Metric("kv_cache_bytes", "f16 KV cache at --context, bytes", False),
        Metric("activation_bytes", "largest live activation buffers of a prefill step", False),
        Metric("nonzero_params", "weights of the searched tensors left after pruning, count",
               False),
        Metric("latency_ms", "predicted decode time per token on --device at --context", False),
        Metric("prefill_ms", "predicted prefill time of --prompt-tokens on --device", False),
        Metric("energy_mj", "predicted energy per decoded token on --device, millijoules", False),
    )
}
ALIASES = {"kl": "kl_nats", "ppl": "perplexity", "memory": "memory_bytes",
           "latency": "latency_ms", "energy": "energy_mj"}
# Reported, never minimized: more is better.
EXTRA_COLUMNS = ("decode_tokens_per_s",)


def metric_names(names: list[str] | str, flag: str = "--objectives") -> list[str]:
    """Validate and normalise metric names (aliases allowed)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        n = ALIASES.get(n, n)
        if n not in METRICS:
            raise UserError(f"{flag}: unknown metric {n!r}; choose from {', '.join(METRICS)}")
        if n not in out:
            out.append(n)
    if not out:
        raise UserError(f"{flag} needs at least one metric; choose from {', '.join(METRICS)}")
    return out
