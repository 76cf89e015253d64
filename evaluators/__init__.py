"""How a candidate is scored. Cost evaluators need only an Arch; quality ones need the model.

Evaluators are looked up by the metric they produce (`EVALUATORS`), never by if-chains.
"""

from llmpareto.evaluators.base import Candidate, Evaluator, METRICS, metric_names
from llmpareto.evaluators.cost import MemoryEvaluator
from llmpareto.evaluators.quality import KLEvaluator, PerplexityEvaluator

__all__ = [
    "Candidate", "Evaluator", "METRICS", "metric_names",
    "MemoryEvaluator", "PerplexityEvaluator", "KLEvaluator",
]
