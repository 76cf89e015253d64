"""How a candidate is scored. Cost evaluators need only an Arch and a DeviceProfile;
quality ones need the model. `METRICS` names every metric, its unit and who needs a model.
"""

from llmpareto.evaluators.base import METRICS, Candidate, Evaluator, metric_names
from llmpareto.evaluators.cost import LatencyEnergyEvaluator, MemoryEvaluator

# Every evaluator by name (module:class; quality ones import torch, so they load on demand).
REGISTRY = {
    "memory": "llmpareto.evaluators.cost:MemoryEvaluator",
    "latency_energy": "llmpareto.evaluators.cost:LatencyEnergyEvaluator",
    "perplexity": "llmpareto.evaluators.quality:PerplexityEvaluator",
    "kl": "llmpareto.evaluators.quality:KLEvaluator",
}


def get_evaluator(name: str) -> type:
    import importlib

    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def chosen(objectives: list[str] | tuple[str, ...]) -> list[str]:
    """The evaluators a run builds, by name: every analytic one (budgets and the fit to the
    device read them; microseconds), and the model-reading ones whose metrics are objectives,
    or perplexity when no objective is a quality metric (the front still shows quality)."""
    classes = {n: get_evaluator(n) for n in REGISTRY}
    analytic = [n for n, c in classes.items() if not c.needs_model]
    quality = [n for n, c in classes.items() if c.needs_model
               and set(c.metrics) & set(objectives)]
    return analytic + (quality or ["perplexity"])


def __getattr__(name: str):
    # quality evaluators import torch: only when asked for, so the cost model and llama.cpp
    # timing run without it (a CUDA llama.cpp and torch's CUDA libraries can clash in one
    # process)
    if name in ("KLEvaluator", "PerplexityEvaluator"):
        from llmpareto.evaluators import quality

        return getattr(quality, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METRICS",
    "REGISTRY",
    "Candidate",
    "Evaluator",
    "KLEvaluator",
    "LatencyEnergyEvaluator",
    "MemoryEvaluator",
    "PerplexityEvaluator",
    "chosen",
    "get_evaluator",
    "metric_names",
]
