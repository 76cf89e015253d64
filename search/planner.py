"""The search space as a knapsack problem (`Planner`): per (key, choice) a value (the
sensitivity profile's KL increase) and additive costs, the budgets a sweep seeds, and the
least-sensitivity allocation within each (search/allocate.py holds the solvers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmpareto.recipe import Recipe
from llmpareto.search import allocate

COST_METRICS = ("memory_bytes", "weights_bytes", "latency_ms", "prefill_ms", "energy_mj")
LOSSLESS_NATS = 1e-3  # summed KL increase (or 1% of the range) where the sweep stops


@dataclass
class Planner:
    """The space as a knapsack problem: a value (sensitivity) and, per cost metric, an
    additive cost for every (key, choice); selections are lists of choice indices."""

    runner: Any  # search.runner.TrialRunner
    profile: dict

    def __post_init__(self) -> None:
        space = self.runner.space
        self.keys = list(space.choices)
        self.choices = [list(space.choices[k]) for k in self.keys]
        worst = max([v for k in self.keys for v in self.profile["delta_kl_nats"][k]
                     if v is not None] or [1.0])
        self.values = [[worst * 10 + 1 if v is None else v for v in
                        self.profile["delta_kl_nats"][k]] for k in self.keys]
        self.ref = [self.choices[i].index(self.profile["reference"][k])
                    for i, k in enumerate(self.keys)]
        base = self._cost(self.ref)
        self.metrics = [m for m in base.metrics if m in COST_METRICS]
        self.costs: dict[str, list[list[float]]] = {m: [] for m in self.metrics}
        for g in range(len(self.keys)):
            rows = [self._cost(self.ref[:g] + [c] + self.ref[g + 1:]).metrics
                    for c in range(len(self.choices[g]))]
            for m in self.metrics:
                self.costs[m].append([r[m] - base.metrics[m] for r in rows])
        self.base = base.metrics
        self.ladder = allocate.ladders(self.values, self.costs[self.swept])
        objectives = self.runner.settings.objectives
        self.quality = next((o for o in objectives if o not in COST_METRICS), objectives[0])

    @property
    def swept(self) -> str:
        """The cost the sweep spans: the first cost objective, else the first budgeted one."""
        objectives = self.runner.settings.objectives
        for m in [*objectives, *self.runner.budget.constraints(self.base)]:
            if m in self.metrics:
                return m
        return "memory_bytes"

    def params(self, sel: list[int]) -> dict[str, Any]:
        return {k: self.choices[g][c] for g, (k, c) in enumerate(zip(self.keys, sel))}

    def selection(self, params: dict[str, Any]) -> list[int]:
        return [self.choices[g].index(params[k]) for g, k in enumerate(self.keys)]

    def _cost(self, sel: list[int]):
        return self.runner.cost_only(self.runner.space.recipe_from_params(self.params(sel)))

    def excess(self, sel: list[int]) -> list[float]:
        return list(self._cost(sel).constraints.values())

    def repair(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` lowered on their least sensitive keys until every budget is met; as they
        were when they meet it already, or when nothing in the space does."""
        sel = self.selection(params)
        names = list(self._cost(sel).constraints)
        costs = [self.costs[n] for n in names if n in self.costs]
        if len(costs) != len(names):  # a constraint with no cost table: nothing to repair by
            return params
        fixed = allocate.repair(sel, self.values, costs, self.excess)
        return params if fixed is None else self.params(fixed)

    def budgets(self, n: int) -> list[float]:
        """`n` budgets of the swept cost, evenly spaced over `span()`."""
        return evenly(*self.span(), n)

    def span(self) -> tuple[float, float]:
        """The swept cost from the cheapest selection to the least cost at which the knapsack
        is (nearly) lossless (at most the budget's limit): above it, more cost buys no
        quality the profile can see."""
        m = self.swept
        lo = self.base[m] + sum(min(r) for r in self.costs[m])
        hi = self.base[m] + sum(max(r) for r in self.costs[m])
        b = self.runner.budget
        limit = {"memory_bytes": b.max_memory_bytes, "latency_ms": b.max_latency_ms,
                 "energy_mj": b.max_energy_mj}.get(m)
        if limit is not None:
            hi = min(hi, limit)
        floor = self._value(self.knapsack(hi))
        worst = self._value(self.knapsack(lo + (hi - lo) * 1e-9))
        near = min(LOSSLESS_NATS, 0.01 * (worst - floor)) if worst < float("inf") else \
            LOSSLESS_NATS
        a, z = lo, hi  # bisect: the least budget whose optimum is within `near` of `floor`
        for _ in range(30):
            mid = (a + z) / 2
            if self._value(self.knapsack(mid)) <= floor + near:
                z = mid
            else:
                a = mid
        return lo, z

    def _value(self, sel: list[int] | None) -> float:
        return float("inf") if sel is None else allocate.total(self.values, sel)

    def knapsack(self, budget: float) -> list[int] | None:
        m = self.swept
        return allocate.knapsack(self.values, self.costs[m], budget - self.base[m])

    def seeds(self, n: int, anchors: Sequence[tuple[str, Recipe]] = ()
              ) -> list[tuple[str, dict[str, Any]]]:
        """(label, params) of the least-sensitivity allocation at each of `n` budgets,
        repaired against the other budgets, without repeats. The first budgets are the swept
        costs of the `anchors` (label, whole recipe) that lie within `span()`: given
        llama.cpp's presets, the run holds the profile's best allocation at no more than each
        preset's cost, the comparison a user makes. The rest are evenly spaced, in spread
        order, so the first few trials already span the front."""
        lo, hi = self.span()
        at = [(b, f" (at {label})") for label, b in
              ((label, self.runner.cost_only(r).metrics[self.swept]) for label, r in anchors)
              if lo <= b <= hi][:n]
        even = evenly(lo, hi, n - len(at))  # the span solved once (30+ knapsacks)
        out, seen = [], set()
        for b, why in at + [(even[i], "") for i in allocate.spread_order(len(even))]:
            sel = self.knapsack(b)
            if sel is None:
                continue
            params = self.repair(self.params(sel))
            key = tuple(sorted(params.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                out.append((f"knapsack {self.swept}<={_short(b, self.swept)}{why}", params))
        return out

    def fits(self, budget: float) -> Callable[[list[int]], bool]:
        def ok(sel: list[int]) -> bool:
            r = self._cost(sel)
            return r.metrics[self.swept] <= budget and all(v <= 0 for v in
                                                           r.constraints.values())
        return ok


def _short(value: float, metric: str) -> str:
    return f"{value / 1e6:.4g}MB" if metric.endswith("bytes") else f"{value:.4g}"


def evenly(lo: float, hi: float, n: int) -> list[float]:
    """`n` budgets evenly spaced over (lo, hi], the last at `hi`."""
    return [lo + (hi - lo) * (i + 1) / n for i in range(n)]
