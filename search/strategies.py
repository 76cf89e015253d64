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
from llmpareto.search.planner import COST_METRICS, Planner
from llmpareto.search.records import SEED_ATTR
from llmpareto.search.samplers import SAMPLERS

EVO_OFFSPRING = 8  # children screened per generation on the fewest tokens
EVO_KEEP = 2  # ... of which this many are screened again on every calibration token
EVO_GENERATIONS = 2  # generations tried per trial until a child beats its parent
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


def enqueue_seeds(study: optuna.Study, settings, planner: Planner | None, baselines: int,
                  presets: list | None = None) -> int:
    """The knapsack allocations a knapsack/evolve run starts from, first at the cost of each
    of `presets` (label, params, Recipe: llama.cpp's, as enqueued as baselines); how many
    were enqueued."""
    name = resolve(settings)
    if planner is None or name not in NEEDS_PROFILE:
        return 0
    # a resumed run has its seeds already; one killed while enqueueing them gets the rest
    present = {t.user_attrs.get(SEED_ATTR) for t in study.get_trials(deepcopy=False)}
    n = sweep_size(settings, name, baselines)
    anchors = [(label, recipe) for label, _, recipe in presets or []]
    seeds = planner.seeds(n, anchors) if n > 0 else []
    for label, params in seeds:
        if label not in present:
            study.enqueue_trial(params, user_attrs={SEED_ATTR: label}, skip_if_exists=True)
    return len(seeds)
