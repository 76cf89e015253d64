"""The strategies' allocation math against brute force on small random problems."""

import itertools
import random

import pytest

from llmpareto.search.allocate import (
    knapsack,
    ladders,
    level_switch,
    repair,
    snap,
    spread_order,
    total,
)


def _problem(rng: random.Random, groups: int, choices: int, integral: bool):
    values = [[rng.uniform(0, 1) for _ in range(choices)] for _ in range(groups)]
    costs = [[rng.randint(1, 20) if integral else rng.uniform(0.5, 20.0)
              for _ in range(choices)] for _ in range(groups)]
    return values, costs


def _brute(values, costs, budget):
    best = None
    for sel in itertools.product(*(range(len(r)) for r in values)):
        if total(costs, sel) <= budget + 1e-9 and (
                best is None or total(values, sel) < total(values, best) - 1e-12):
            best = sel
    return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_is_optimal_on_integer_costs(seed):
    rng = random.Random(seed)
    values, costs = _problem(rng, rng.randint(1, 5), rng.randint(1, 4), integral=True)
    budget = rng.randint(0, 60)
    got, want = knapsack(values, costs, budget), _brute(values, costs, budget)
    if want is None:
        assert got is None
    else:
        assert got is not None and total(costs, got) <= budget
        assert total(values, got) == pytest.approx(total(values, want), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_on_real_costs_is_feasible_and_near_optimal(seed):
    rng = random.Random(100 + seed)
    values, costs = _problem(rng, 5, 4, integral=False)
    budget = rng.uniform(10, 70)
    got, want = knapsack(values, costs, budget, resolution=4096), _brute(values, costs, budget)
    if want is None:
        assert got is None
        return
    assert got is not None and total(costs, got) <= budget + 1e-9
    # rounding costs up loses at most one step per group: the exact optimum at a budget
    # that much lower is never better than what the DP found
    step = (budget - sum(min(r) for r in costs)) / 4096
    tighter = _brute(values, costs, budget - 5 * step)
    if tighter is not None:
        assert total(values, got) <= total(values, tighter) + 1e-12
    assert total(values, got) >= total(values, want) - 1e-12


def test_ladders_keep_only_undominated_choices():
    values = [[0.0, 0.5, 0.5, 0.2, 1.0]]
    costs = [[16, 4, 8, 8, 2]]
    assert ladders(values, costs) == [[4, 1, 3, 0]]  # cost 2, 4, 8 (the better of two), 16


@pytest.mark.parametrize("seed", range(30))
def test_repair_returns_a_feasible_selection_whenever_one_exists(seed):
    rng = random.Random(200 + seed)
    values, costs = _problem(rng, rng.randint(1, 5), rng.randint(1, 4), integral=True)
    # a second constraint that moves with the first (latency rises with bytes)
    costs2 = [[2 * c + 1 for c in row] for row in costs]
    budget, budget2 = rng.randint(0, 60), rng.randint(0, 150)
    start = [rng.randrange(len(r)) for r in values]

    def excess(sel):
        return [total(costs, sel) - budget, total(costs2, sel) - budget2]

    got = repair(start, values, [costs, costs2], excess)
    exists = any(max(excess(list(sel))) <= 0 for sel in
                 itertools.product(*(range(len(r)) for r in values)))
    if exists:
        assert got is not None and max(excess(got)) <= 0
    else:
        assert got is None


def test_repair_lowers_the_least_sensitive_group_first():
    values = [[0.0, 0.9], [0.0, 0.1]]  # group 1 barely cares about going cheap
    costs = [[10, 5], [10, 5]]
    got = repair([0, 0], values, [costs], lambda s: [total(costs, s) - 15])
    assert got == [0, 1]


def test_repair_keeps_a_feasible_selection():
    values, costs = [[0.0, 1.0]], [[10, 5]]
    assert repair([0], values, [costs], lambda s: [total(costs, s) - 10]) == [0]


@pytest.mark.parametrize("seed", range(30))
def test_level_switches_never_break_the_budget(seed):
    rng = random.Random(300 + seed)
    values, costs = _problem(rng, 6, 5, integral=False)
    lad = ladders(values, costs)
    budget = sum(min(r) for r in costs) + rng.uniform(0, 40)
    sel = knapsack(values, costs, budget)
    assert sel is not None
    sel = snap(sel, lad, costs)
    assert total(costs, sel) <= budget + 1e-9

    def fits(s):
        return total(costs, s) <= budget

    for _ in range(50):
        child = level_switch(sel, lad, fits, rng, switches=rng.randint(1, 3))
        if child is None:
            continue
        assert total(costs, child) <= budget + 1e-9
        assert all(c in lad[g] for g, c in enumerate(child))
        sel = child


def test_level_switch_moves_one_group_up_and_one_down():
    lad, costs = [[0, 1, 2], [0, 1, 2]], [[0, 1, 2], [0, 1, 2]]
    child = level_switch([1, 1], lad, lambda s: total(costs, s) <= 2, random.Random(0))
    assert sorted(child) == [0, 2]  # no slack: one up needs one down


def test_level_switch_uses_slack_with_an_up_move_alone():
    lad, costs = [[0, 1, 2], [0, 1, 2]], [[0, 1, 2], [0, 1, 2]]
    child = level_switch([0, 0], lad, lambda s: total(costs, s) <= 1, random.Random(0))
    assert sorted(child) == [0, 1]  # nothing can go down; the budget allows one step up


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 60])
def test_spread_order_is_a_permutation_whose_prefixes_cover_the_range(n):
    order = spread_order(n)
    assert sorted(order) == list(range(n))
    if n >= 3:
        assert order[0] == n - 1 and abs(order[1] - (n - 1) / 2) <= 0.5
        assert min(order[:3]) <= (n - 1) / 4 + 0.5  # three trials already span 3/4 of it
