"""Allocation math of the search strategies, on plain lists: the multiple-choice knapsack
(HAWQ / AutoQuantize seeding), HAQ-style budget repair and EvoPress-style level switches.

A problem is G groups (search-space keys); group g has choices c with a value v[g][c] (the
sensitivity, lower is better) and an additive cost k[g][c] (bytes, ms, mJ). A selection is
one choice index per group. No torch, no Optuna: the glue is in search/strategies.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np

Table = Sequence[Sequence[float]]


def total(table: Table, sel: Sequence[int]) -> float:
    return float(sum(table[g][c] for g, c in enumerate(sel)))


def knapsack(values: Table, costs: Table, budget: float, resolution: int = 16384
             ) -> list[int] | None:
    """The selection of least summed value whose summed cost is <= `budget`; None when even
    the cheapest selection costs more.

    Dynamic programming over cost: each group's costs are shifted by its cheapest choice, so
    the free budget runs from 0 to `budget - sum(min costs)`. Integer costs with a free budget
    <= `resolution` are solved exactly; otherwise costs are rounded *up* to `free/resolution`
    steps, so the answer is always within budget and at most one step per group from optimal.
    """
    lo = [min(row) for row in costs]
    free = budget - sum(lo)
    if free < 0:
        return None
    shifted = [[c - m for c in row] for row, m in zip(costs, lo)]
    integral = all(float(c).is_integer() for row in shifted for c in row)
    step = 1.0 if integral and free <= resolution else max(free / resolution, 1e-300)
    cap = math.floor(free / step + 1e-9)
    units = [[math.ceil(c / step - 1e-9) for c in row] for row in shifted]
    best = np.zeros(cap + 1)  # best[b]: least value of the groups so far using <= b units
    pick = np.zeros((len(values), cap + 1), dtype=np.int32)
    for g, (vals, us) in enumerate(zip(values, units)):
        new = np.full(cap + 1, np.inf)
        for c, (v, u) in enumerate(zip(vals, us)):
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + v
            better = cand < new
            new[better] = cand[better]
            pick[g][better] = c
        best = new
    if not math.isfinite(best[cap]):
        return None
    sel, b = [0] * len(values), cap
    for g in range(len(values) - 1, -1, -1):
        sel[g] = int(pick[g][b])
        b -= units[g][sel[g]]
    return sel


def ladders(values: Table, costs: Table) -> list[list[int]]:
    """Per group, its useful choices by rising cost: no choice on a ladder is dominated (costs
    as much or more and is no better) by another, so going up a rung always buys quality."""
    out = []
    for vals, cs in zip(values, costs):
        order = sorted(range(len(cs)), key=lambda c: (cs[c], vals[c]))
        rungs: list[int] = []
        for c in order:  # rising cost; keep only what lowers the value further
            if not rungs or vals[c] < vals[rungs[-1]]:
                rungs.append(c)
        out.append(rungs)
    return out


def repair(sel: Sequence[int], values: Table, costs: Sequence[Table],
           excess: Callable[[list[int]], Sequence[float]]) -> list[int] | None:
    """Lower `sel` on its least sensitive groups until it fits (HAQ's budget repair).

    `costs[d][g][c]` is an additive model of constraint d, `excess(sel)` the true amount by
    which each constraint is exceeded (<= 0: met). Each step takes the move, over all groups
    and cheaper choices, that adds the least value per unit of the violated constraints' cost
    saved, among moves that raise no constraint's cost. Returns None only when no such move is
    left and a constraint is still exceeded: with costs monotone per group, every group then
    sits at its cheapest choice, so no feasible selection exists.
    """
    sel = list(sel)
    for _ in range(sum(len(row) for row in values) + 1):
        over = [i for i, e in enumerate(excess(sel)) if e > 0]
        if not over:
            return sel
        best, move = math.inf, None
        for g, c0 in enumerate(sel):
            for c in range(len(values[g])):
                if any(k[g][c] > k[g][c0] for k in costs):
                    continue
                saved = sum(costs[d][g][c0] - costs[d][g][c] for d in over)
                if saved <= 0:
                    continue
                ratio = (values[g][c] - values[g][c0]) / saved
                if ratio < best:
                    best, move = ratio, (g, c)
        if move is None:
            return None
        sel[move[0]] = move[1]
    return sel if not any(e > 0 for e in excess(sel)) else None


def level_switch(sel: Sequence[int], ladder: Sequence[Sequence[int]],
                 fits: Callable[[list[int]], bool], rng: random.Random, switches: int = 1,
                 tries: int = 64) -> list[int] | None:
    """EvoPress's mutation: `switches` times, move one group up a rung of its ladder and
    another down one, keeping only a result that `fits` the budget; where the budget has
    slack, the up move alone is tried too (half the time). Returns None when no fitting
    switch was found in `tries` draws (the caller keeps the parent)."""
    out = list(sel)

    def rung(g: int, c: int) -> int:
        return ladder[g].index(c) if c in ladder[g] else -1

    for _ in range(switches):
        up = [g for g, c in enumerate(out) if 0 <= rung(g, c) < len(ladder[g]) - 1]
        down = [g for g, c in enumerate(out) if rung(g, c) > 0]
        done = False
        for _ in range(tries if up else 0):
            a = rng.choice(up)
            cand = list(out)
            cand[a] = ladder[a][rung(a, out[a]) + 1]
            others = [g for g in down if g != a]
            if others and (rng.random() < 0.5 or not fits(cand)):
                b = rng.choice(others)
                cand[b] = ladder[b][rung(b, out[b]) - 1]
            if fits(cand):
                out, done = cand, True
                break
        if not done:
            return None if out == list(sel) else out
    return out


def spread_order(n: int) -> list[int]:
    """The indices 0..n-1 in an order whose every prefix spreads over the range (van der
    Corput): the last first, then the middle, the lower quarter, the upper one, ... so a sweep
    cut short still covers it."""
    out: list[int] = []
    seen: set[int] = set()
    k = 0
    while len(out) < n:
        v, denom, x = 0.0, 1.0, k
        while x:
            denom *= 2
            v += (x & 1) / denom
            x >>= 1
        i = n - 1 if k == 0 else round(v * (n - 1))
        if i not in seen:
            seen.add(i)
            out.append(i)
        k += 1
    return out


def snap(sel: Sequence[int], ladder: Sequence[Sequence[int]], costs: Table) -> list[int]:
    """Each group's choice moved to the most expensive rung of its ladder that costs no more,
    so a selection made elsewhere (a sampler, a preset) can be level-switched."""
    out = []
    for g, c in enumerate(sel):
        ok = [r for r in ladder[g] if costs[g][r] <= costs[g][c]]
        out.append(ok[-1] if ok else ladder[g][0])
    return out
