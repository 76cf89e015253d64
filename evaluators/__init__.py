"""How a candidate is scored. Cost evaluators need only an Arch and a DeviceProfile;
quality ones need the model. `METRICS` names every metric, its unit and who needs a model.
"""

from llmpareto.evaluators.base import METRICS, Candidate, Evaluator, metric_names
from llmpareto.evaluators.cost import LatencyEnergyEvaluator, MemoryEvaluator
from llmpareto.evaluators.quality import KLEvaluator, PerplexityEvaluator

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
