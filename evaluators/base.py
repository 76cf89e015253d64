"""The Evaluator contract and the table of metrics (name, unit, which evaluator makes it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from llmpareto.recipe import Recipe


@dataclass
class Candidate:
    """What an evaluator looks at: the recipe, and (for quality) the model it was applied to."""

    recipe: Recipe
    formats: dict[str, str | None]  # effective per-tensor formats (Arch.formats_for)
    model: Any = None
    extra: dict = field(default_factory=dict)


class Evaluator(Protocol):
    metrics: ClassVar[tuple[str, ...]]  # metric names it returns, units in the names
    needs_model: ClassVar[bool]  # False: analytic, runs before any forward pass

    def evaluate(self, candidate: Candidate) -> dict[str, float]: ...


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    needs_model: bool


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("perplexity", "perplexity on the evaluation windows (lower is better)", True),
        Metric("kl_nats", "mean KL(base || candidate) per token on calibration windows, nats", True),
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
    from llmpareto.errors import UserError

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
