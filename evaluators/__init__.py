"""How a candidate is scored. Cost evaluators need only an Arch and a DeviceProfile;
quality ones need the model. `METRICS` names every metric, its unit and who needs a model.
"""

from llmpareto.evaluators.base import METRICS, Candidate, Evaluator, metric_names
from llmpareto.evaluators.cost import LatencyEnergyEvaluator, MemoryEvaluator


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
    "Candidate",
    "Evaluator",
    "KLEvaluator",
    "LatencyEnergyEvaluator",
    "MemoryEvaluator",
    "PerplexityEvaluator",
    "metric_names",
]
