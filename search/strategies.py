"""Search strategies by name (`--strategy`): Optuna's samplers, knapsack seeding from the
sensitivity profile, EvoPress-style level-switch evolution, and HAQ-style budget repair.

Every strategy is an Optuna sampler plus the trials it enqueues, so each one writes the same
study, resumes from it and runs on every backend (the sampler lives where trials are asked).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from llmpareto.search import allocate
from llmpareto.search.records import SEED_ATTR
from llmpareto.search.samplers import SAMPLERS

COST_METRICS = ("memory_bytes", "weights_bytes", "latency_ms", "prefill_ms", "energy_mj")
EVO_OFFSPRING = 8  # children screened per generation on the fewest tokens
EVO_KEEP = 2  # ... of which this many are screened again on every calibration token
EVO_GENERATIONS = 2  # generations tried per trial until a child beats its parent
LOSSLESS_NATS = 1e-3  # summed KL increase (or 1% of the range) where the sweep stops
EVOLVE_ATTR = "llmpareto:evolve_budget"  # system attr of an evolved trial: its budget
AUTO = "knapsack"  # what `auto` runs where it can: the benchmark's favourite (docs/strategies.md)


def has_budget(settings) -> bool:
    return any(v is not None for v in (settings.max_memory, settings.max_latency_ms,
                                        settings.max_energy_mj))


def can_sweep(settings) -> bool:
    """A cost objective to sweep budgets of, and no --sweep 0."""
    return any(o in COST_METRICS for o in settings.objectives) and settings.sweep != 0


def resolve(settings) -> str:
    """The strategy a run uses: `auto` is AUTO where a profile can be measured and there is a
    cost to sweep or a budget to fill, else NSGA-II."""
    if settings.strategy != "auto":
        return settings.strategy
    fills = has_budget(settings) or can_sweep(settings)
    return AUTO if settings.calib_tokens > 0 and fills else "nsga2"


def uses_profile(settings) -> bool:
    """Whether the run needs the sensitivity profile: its strategy ranks by it, or a budget
    is set and proposals over it are repaired."""
    return resolve(settings) in NEEDS_PROFILE or (settings.repair and has_budget(settings)
                                                  and settings.calib_tokens > 0)


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
        """`n` budgets of the swept cost, evenly spaced from the cheapest selection to the
        least cost at which the knapsack is (nearly) lossless (at most the budget's limit):
        above it, more cost buys no quality the profile can see."""
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
        return [lo + (z - lo) * (i + 1) / n for i in range(n)]

    def _value(self, sel: list[int] | None) -> float:
        return float("inf") if sel is None else allocate.total(self.values, sel)

    def knapsack(self, budget: float) -> list[int] | None:
        m = self.swept
        return allocate.knapsack(self.values, self.costs[m], budget - self.base[m])

    def seeds(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        """(label, params) of the least-sensitivity allocation at each of `n` budgets,
        repaired against the other budgets, without repeats; in spread order, so the first
        few trials already span the front."""
        out, seen = [], set()
        budgets = self.budgets(n)
        for b in (budgets[i] for i in allocate.spread_order(len(budgets))):
            sel = self.knapsack(b)
            if sel is None:
                continue
            params = self.repair(self.params(sel))
            key = tuple(sorted(params.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                out.append((f"knapsack {self.swept}<={_short(b, self.swept)}", params))
        return out

    def fits(self, budget: float) -> Callable[[list[int]], bool]:
        def ok(sel: list[int]) -> bool:
            r = self._cost(sel)
            return r.metrics[self.swept] <= budget and all(v <= 0 for v in
                                                           r.constraints.values())
        return ok


def _short(value: float, metric: str) -> str:
    return f"{value / 1e6:.4g}MB" if metric.endswith("bytes") else f"{value:.4g}"


def distributions(space) -> dict[str, CategoricalDistribution]:
    return {k: CategoricalDistribution(list(c)) for k, c in space.choices.items()}


class _Wrapped(optuna.samplers.BaseSampler):
    """Forwards the trial lifecycle to `base`; proposes every key at once (relative)."""

    def __init__(self, base: optuna.samplers.BaseSampler, dists: dict) -> None:
        self.base, self.dists = base, dists

    def infer_relative_search_space(self, study, trial):
        return dict(self.dists)

    def sample_independent(self, study, trial, name, distribution):
        return self.base.sample_independent(study, trial, name, distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def _full(self, study, trial) -> dict[str, Any]:
        params = dict(self.base.sample_relative(
            study, trial, self.base.infer_relative_search_space(study, trial)))
        for k, d in self.dists.items():
            if k not in params:
                params[k] = self.base.sample_independent(study, trial, k, d)
        return params


class RepairSampler(_Wrapped):
    """A sampler's proposal, lowered HAQ-style until it meets the budget (never wasted on a
    candidate that cannot be scored); enqueued trials pass untouched."""

    def __init__(self, base, dists, planner: Planner) -> None:
        super().__init__(base, dists)
        self.planner = planner

    def sample_relative(self, study, trial, search_space):
        if "fixed_params" in trial.system_attrs:
            return {}
        return self.planner.repair(self._full(study, trial))


class EvolveSampler(_Wrapped):
    """EvoPress-style level-switch evolution at fixed budgets, one budget per trial in turn.
    The best scored recipe within the budget is the parent; its children move one key up a
    level and another down, so the budget stays met. Children are screened by KL on few
    calibration tokens, the best again on all of them; the winner is scored as the trial only
    if it beats its parent there (elitism), else another generation is tried, and failing
    that the base sampler proposes."""

    def __init__(self, base, dists, planner: Planner, screens: Callable[[], list], seed: int,
                 budgets: list[float], repair: bool = True) -> None:
        super().__init__(base, dists)
        self.planner, self.screens, self.seed, self.targets = planner, screens, seed, budgets
        self.repair = repair
        self._kl: dict[tuple, float] = {}  # (stage, selection) -> KL: screens are exact repeats

    def sample_relative(self, study, trial, search_space):
        if "fixed_params" in trial.system_attrs or not self.targets:
            return {}
        p = self.planner
        budget = self.targets[trial.number % len(self.targets)]
        parent = self._parent(study, budget)
        if parent is None:
            return self._fallback(study, trial)  # nothing within this budget yet
        rng = random.Random(int(hashlib.sha256(f"{self.seed}:{trial.number}".encode())
                                .hexdigest()[:12], 16))
        sel = allocate.snap(p.selection(parent), p.ladder, p.costs[p.swept])
        done = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)}
        fits = p.fits(budget)
        for _ in range(EVO_GENERATIONS):
            kids: list[list[int]] = []
            for _ in range(EVO_OFFSPRING * 4):
                kid = allocate.level_switch(sel, p.ladder, fits, rng, rng.choice((1, 1, 2, 3)))
                if kid and kid not in kids and tuple(sorted(p.params(kid).items())) not in done:
                    kids.append(kid)
                if len(kids) == EVO_OFFSPRING:
                    break
            for stage, keep in enumerate((EVO_KEEP, 1)):
                if len(kids) > keep:
                    kl = [self._screen(stage, k) for k in kids]
                    kids = [k for _, k in sorted(zip(kl, kids), key=lambda x: x[0])][:keep]
            if kids and self._screen(1, kids[0]) < self._screen(1, sel):
                # which budget the child was made for (as NSGA-II records its generation)
                study._storage.set_trial_system_attr(trial._trial_id, EVOLVE_ATTR, budget)
                return p.params(kids[0])
        return self._fallback(study, trial)  # no child beat its parent

    def _fallback(self, study, trial) -> dict:
        """The base sampler's proposal, repaired like RepairSampler's."""
        params = self._full(study, trial)
        return self.planner.repair(params) if self.repair else params

    def _screen(self, stage: int, sel: list[int]) -> float:
        key = (stage, tuple(sel))
        if key not in self._kl:
            recipe = self.planner.runner.space.recipe_from_params(self.planner.params(sel))
            self._kl[key] = self.screens()[stage].kl(recipe)
        return self._kl[key]

    def _parent(self, study, budget: float) -> dict | None:
        p, best = self.planner, None
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            ua = t.user_attrs
            cost, quality = ua.get(p.swept), ua.get(p.quality)
            if (not ua.get("feasible") or cost is None or quality is None or cost > budget
                    or set(t.params) != set(p.keys) or "recipe" in ua):
                continue
            if best is None or quality < best[0]:
                best = (quality, t.params)
        return None if best is None else best[1]


@dataclass(frozen=True)
class Strategy:
    """A search strategy: an Optuna sampler (`base`), wrapped for budget repair when the run
    has a sensitivity profile. Registered by name in REGISTRY (`--strategy NAME`)."""

    name: str
    base: str = "nsga2"  # the Optuna sampler underneath (search/samplers.py)
    needs_profile: bool = False  # ranks candidates by the sensitivity profile

    def sweep(self, left: int) -> int:
        """Budgets the knapsack seeds when `left` trials remain after the baselines."""
        return left

    def sampler(self, settings, runner, planner: Planner, base, dists):
        return RepairSampler(base, dists, planner) if settings.repair else base


class Evolve(Strategy):
    """EvoPress-style level-switch evolution from a few knapsack seeds, children screened by
    KL on growing numbers of tokens."""

    def sweep(self, left: int) -> int:
        return max(2, min(8, left // 4))

    def sampler(self, settings, runner, planner: Planner, base, dists):
        screens: list = []

        def lazy():  # made on first use: a resumed run with nothing left never pays for them
            if not screens:
                from llmpareto.search.sensitivity import KLScreen

                calib = int(runner.windows.calib.size)
                screens.extend([KLScreen(runner, settings.sensitivity_tokens),
                                KLScreen(runner, calib)])
            return screens

        return EvolveSampler(base, dists, planner, lazy, settings.seed,
                             planner.budgets(max(1, sweep_size(settings, self.name))),
                             settings.repair)


REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Strategy("nsga2"), Strategy("tpe", base="tpe"), Strategy("random", base="random"),
    Strategy("knapsack", needs_profile=True), Evolve("evolve", needs_profile=True))}
STRATEGIES = (*REGISTRY, "auto")  # auto: resolve() picks one per run
NEEDS_PROFILE = tuple(n for n, st in REGISTRY.items() if st.needs_profile)


def make_sampler(settings, runner, planner: Planner | None, population: int):
    """The Optuna sampler of `settings.strategy` (resolved), wrapped for budget repair."""
    strategy = REGISTRY[resolve(settings)]
    base = SAMPLERS[strategy.base](settings.seed, population)
    if planner is None:
        return base
    return strategy.sampler(settings, runner, planner, base, distributions(runner.space))


def sweep_size(settings, name: str, baselines: int = 0) -> int:
    """Budgets in the knapsack sweep: --sweep, else every trial left after the baselines
    (knapsack) or a few to evolve from (evolve); none when the baselines fill the run."""
    if settings.sweep is not None:
        return settings.sweep
    left = settings.trials - baselines
    if left <= 0:
        return 0
    return REGISTRY[name].sweep(left)


def plan(settings, runner, run_dir, profile: dict | None = None,
         progress: bool = False) -> Planner | None:
    """The run's Planner (its sensitivity profile: given, cached in `run_dir`, or measured),
    or None when the strategy needs none."""
    if not uses_profile(settings):
        return None
    from llmpareto.search.sensitivity import check, load_or_measure

    if profile is not None:
        profile = check(profile, runner, "the study's sensitivity profile")
        if run_dir is not None:
            from llmpareto.rundir import RunDir
            from llmpareto.search.sensitivity_file import FILE

            RunDir(run_dir).write_json(run_dir / FILE, profile)
    else:
        profile = load_or_measure(runner, run_dir, progress)
    return Planner(runner, profile)


def enqueue_seeds(study: optuna.Study, settings, planner: Planner | None,
                  baselines: int) -> int:
    """The knapsack allocations a knapsack/evolve run starts from; how many were enqueued."""
    name = resolve(settings)
    if planner is None or name not in NEEDS_PROFILE:
        return 0
    # a resumed run has its seeds already; one killed while enqueueing them gets the rest
    present = {t.user_attrs.get(SEED_ATTR) for t in study.get_trials(deepcopy=False)}
    n = sweep_size(settings, name, baselines)
    seeds = planner.seeds(n) if n > 0 else []
    for label, params in seeds:
        if label not in present:
            study.enqueue_trial(params, user_attrs={SEED_ATTR: label}, skip_if_exists=True)
    return len(seeds)
