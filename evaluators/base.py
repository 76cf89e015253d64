"""The Evaluator contract; the table of metrics is llmpareto.metrics (re-exported here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from llmpareto.metrics import (  # noqa: F401 - re-exported
    ALIASES,
    EXTRA_COLUMNS,
    METRICS,
    Metric,
    metric_names,
)
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
