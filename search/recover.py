"""After the trials: the front measured on text the run never calibrated or trained on and,
with `--recover-steps N`, recovered (docs/recovery.md).

Stage 0, measurement. The front and the points near it (the first two non-dominated layers)
get `kl_nats` (KL to the base model on the evaluation windows), `eval_text_perplexity` and
`eval_text_kl_nats` (on `--eval-text`, a text of another domain). Nothing calibrates or trains
on either text: the quantizers calibrate and recovery learns on the calibration text (the
run's `--text` less its evaluation windows).

Stage 1, recovery, successive-halving style: round 0 recovers every one of those points with
`--recover-steps` steps, round r the better half of round r-1's points that gained (points on
the recovered front first, then by relative KL gain) with `--recover-steps * 2**r`, each
continuing from the weights the rounds before kept. Each candidate's method comes from the
registry below by what it changed and the round (a ladder: block-wise reconstruction, then
quantization-aware training for a quantized point); its weights go to `recover/trial-N.safetensors`
and its `recovered_<metric>` and `recovered_eval_text_<metric>` columns to the study (the
source of truth, as every trial's), so a killed run resumes where it stopped and the front is
rebuilt from the recovered metrics (`front.effective`). `pick` exports the recovered weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmpareto.front import RECOVERED, front_mask
from llmpareto.pareto import non_dominated
from llmpareto.recipe import Recipe
from llmpareto.report import PRESET_PREFIX
from llmpareto.search.recover_measure import (  # noqa: F401  (re-exported)
    EVAL_TEXT,
    QUALITY,
    Measure,
    eval_text_windows,
    guard_windows,
    recovery_measure,
    recovery_windows,
)
from llmpareto.search.recover_methods import (  # noqa: F401  (the registry, re-exported)
    PACKED,
    REGISTRY,
    Method,
    choose_method,
    set_start,
)

ROUNDS_ATTR = "llmpareto_recover_rounds"  # study user attr: round -> its trials, once decided
HOLDOUT_KL = "recover_holdout_kl_nats"  # KL on held-out calibration windows, weights in use
GUARD_KL = "recover_guard_kl_nats"  # KL on --recover-guard (a third domain), weights in use


def weights_path(run_dir: Path, trial: int) -> Path:
    return Path(run_dir) / "recover" / f"trial-{trial}.safetensors"


# ---------------------------------------------------------------- the stage


def near_front(trials: pd.DataFrame, objectives: list[str], layers: int = 2) -> list[int]:
    """Trials on the first `layers` non-dominated layers (the trial's own metrics), one per
    recipe, front first."""
    rows = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)].copy()
    vals = rows[objectives].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    ok = np.isfinite(vals).all(axis=1)
    rows, vals = rows[ok], vals[ok]
    same = [c for c in rows.columns if c.startswith("param:")] + list(objectives)
    keep = ~rows.duplicated(subset=same).to_numpy()
    rows, vals = rows[keep], vals[keep]
    out: list[int] = []
    left = np.ones(len(rows), dtype=bool)
    for _ in range(layers):
        if not left.any():
            break
        idx = np.flatnonzero(left)
        nd = idx[non_dominated(vals[idx])]
        out += [int(t) for t in rows["trial"].to_numpy()[nd]]
        left[nd] = False
    return out


def _promoted(trials: pd.DataFrame, objectives: list[str], prev: list[int]) -> list[int]:
    """Round r's candidates: the better half of round r-1's (points on the recovered front
    first, then by relative gain of the first quality objective)."""
    q = next(o for o in objectives if o in QUALITY)
    t = trials.set_index("trial")
    on_front = set(trials.loc[front_mask(trials, objectives), "trial"].astype(int))
    done = [p for p in prev if RECOVERED + q in t.columns and np.isfinite(
        pd.to_numeric(t.loc[p, RECOVERED + q], errors="coerce"))]

    def rank(p: int) -> tuple:
        before, after = float(t.loc[p, q]), float(t.loc[p, RECOVERED + q])
        return (p not in on_front, -(1 - after / before) if before > 0 else 0.0, p)

    return sorted(done, key=rank)[: max(1, math.ceil(len(prev) / 2))] if done else []


@dataclass
class Job:
    """One point to recover in a round: what a pool needs to run it anywhere."""

    trial: int
    recipe: Recipe
    steps: int
    before: dict
    rung: int = 0  # the round: which method of the ladder
    start: tuple[dict[str, torch.Tensor], bool] | None = None  # the weights kept so far


# a round's jobs and a function that recovers one job here -> (trial, Outcome) as each finishes
Pool = Callable[[list[Job], Callable[[Job], "Outcome"]], Iterator[tuple[int, "Outcome"]]]


def after_search(bench, study, rd, settings, progress: bool = True,
                 pool: Pool | None = None) -> None:
    """Stage 0 (measurement) and stage 1 (recovery) for `study`'s run in `rd`; everything is
    recorded in the study as it is measured and trials.csv/front.csv rewritten. `pool` runs a
    round's jobs and yields (trial, Outcome) as each finishes, in any order (the Ray
    backend's runs them on the cluster); by default they run here, one after another. The
    outcomes are written here either way, one point at a time, so a kill loses at most the
    points in flight."""
    from llmpareto.search.records import (
        AFTER_ATTR,
        record_after_search,
        trials_frame,
        write_outputs,
    )

    if settings.eval_text == "none" and not settings.recover_steps:
        return
    objectives = settings.objectives

    def after() -> dict:
        return study.user_attrs.get(AFTER_ATTR, {})

    def record(trial: int, values: dict) -> None:
        record_after_search(study, trial, values)
        write_outputs(study, rd, objectives, plot=False)

    trials = trials_frame(study, rd)
    # recovery takes the points near the front too (it can reorder them); measuring, the
    # front and llama.cpp's presets (what a user compares against)
    todo = near_front(trials, objectives, layers=2 if settings.recover_steps else 1)
    is_preset = (trials["baseline"].fillna("").astype(str).str.startswith(PRESET_PREFIX)
                 & trials["feasible"].astype(bool) & (trials["state"] == "COMPLETE"))
    presets = [int(t) for t in trials.loc[is_preset, "trial"]]
    wanted = ["kl_nats"] + ([f"{EVAL_TEXT}{m}" for m in QUALITY]
                             if settings.eval_text != "none" else [])
    measure_todo = [t for t in dict.fromkeys(todo + presets) if not set(wanted) <= set(after().get(str(t), {}))]
    rounds = settings.recover_rounds if settings.recover_steps else 0
    if not measure_todo and not rounds:
        return
    from tqdm.auto import tqdm

    learn, measure = recovery_measure(bench) if rounds else \
        (None, Measure(bench, eval_text_windows(bench)))
    for t in tqdm(measure_todo, desc="measuring the front", unit="point", leave=False,
                  disable=not progress):
        bench.build(Recipe.load(rd.recipe_path(t)))
        record(t, {k: v for k, v in measure().items() if k in wanted})
    if not rounds:
        return
    plan = {int(k): v for k, v in study.user_attrs.get(ROUNDS_ATTR, {}).items()}
    for r in range(rounds):
        steps = settings.recover_steps * 2 ** r
        if r not in plan:
            plan[r] = todo if r == 0 else _promoted(trials_frame(study, rd), objectives,
                                                    plan[r - 1])
            study.set_user_attr(ROUNDS_ATTR, {str(k): v for k, v in plan.items()})
        seen = after()  # one read of the study for the round
        now = {t: seen.get(str(t), {}) for t in plan[r]}
        left = [t for t in plan[r] if now[t].get("recover_steps", 0) < steps
                and now[t].get("recover_method") != "none"]
        jobs = [Job(t, Recipe.load(rd.recipe_path(t)), steps, now[t], r,
                    load_recovered(rd.path, t) if now[t].get("recover_used") else None)
                for t in left]

        def here(j: Job) -> Outcome:
            return recover_point(bench, j.recipe, j.trial, j.steps, learn, measure, settings,
                                 progress=progress, before=j.before, rung=j.rung,
                                 start=j.start)

        run = pool or (lambda jobs, here: ((j.trial, here(j)) for j in jobs))
        for t, outcome in tqdm(run(jobs, here), total=len(jobs), unit="point",
                               desc=f"recovering, round {r + 1}/{rounds} ({steps} steps)",
                               disable=not progress, dynamic_ncols=True):
            record(t, save_outcome(rd.path, t, outcome))
    write_outputs(study, rd, objectives)


@dataclass
class Outcome:
    """One point's recovery: its new columns and, when it keeps them, the recovered weights
    (fqn -> tensor, `PACKED` keys for K-quant blocks) with the metadata their file carries.
    Plain tensors and dicts: a Ray task returns it to the driver, which writes it."""

    columns: dict
    weights: dict[str, torch.Tensor] | None = None
    meta: dict | None = None


def recover_point(bench, recipe: Recipe, trial: int, steps: int, windows: np.ndarray,
                  measure: Measure, settings, progress: bool = False,
                  before: dict | None = None, rung: int = 0,
                  start: tuple[dict[str, torch.Tensor], bool] | None = None) -> Outcome:
    """Recover one trial's candidate on `bench` with round `rung`'s method, from `start` (the
    weights earlier rounds kept) or its post-training weights; it keeps the recovered
    weights only when they are closer to the base model (KL) on the held-out calibration
    windows than what it has now (its post-training weights, or an earlier round's) and no
    further from it on the guard text (`--recover-guard`, when the run has one; `vetoed`). Its
    new columns: `recover_method` and `recover_steps` (this round's, tried), `recover_s`,
    `recover_holdout_kl_nats` and `recover_guard_kl_nats` (of the weights it now has),
    `recover_veto` (what stopped this round's weights, "" if kept), `recover_used`, `recover_chain`
    (the methods that made the weights it keeps, e.g. `reconstruct+qat`) and, when it has
    recovered weights, the `recovered_*` scores. Writes nothing (see `save_outcome`)."""
    before = before or {}
    method = choose_method(bench, recipe, settings.recover_method, rung)
    if method is None:
        return Outcome({"recover_method": "none"})
    now_kl, now_guard = before.get(HOLDOUT_KL), before.get(GUARD_KL)
    if now_kl is None or (now_guard is None and measure.guard is not None):
        # the weights the point has now, as scored: post-training, or an earlier round's
        try:
            if start is not None:
                use_recovered(bench, recipe, *start)
            else:
                bench.build(recipe)
            now_kl = measure.holdout_kl() if now_kl is None else now_kl
            now_guard = measure.guard_kl() if now_guard is None else now_guard
        finally:
            bench.cache.set_override({})
    t0 = time.perf_counter()
    try:
        weights, exact = REGISTRY[method].run(bench, recipe, windows, steps,
                                              settings.seed + trial, progress, measure.holdout,
                                              start=start)
    except torch.OutOfMemoryError:
        raise _out_of_memory(bench, trial, method) from None
    seconds = time.perf_counter() - t0
    out = {"recover_method": method, "recover_steps": steps, "recover_s": round(seconds, 3)}
    try:
        use_recovered(bench, recipe, weights, exact)
        got_kl, got_guard = measure.holdout_kl(), measure.guard_kl()
        veto = vetoed(now_kl, got_kl, now_guard, got_guard)
        if veto:  # not closer to the base where it never learned: keep what it has
            return Outcome({**out, HOLDOUT_KL: now_kl, **_guard(now_guard), "recover_veto": veto,
                            "recover_used": bool(before.get("recover_used")),
                            **({"recover_chain": before["recover_chain"]}
                               if before.get("recover_chain") else {})})
        scores = measure(RECOVERED)
    finally:
        bench.cache.set_override({})
    by = f"{before['recover_chain']}+{method}" if start is not None and before.get(
        "recover_chain") else method
    return Outcome({**scores, **out, HOLDOUT_KL: got_kl, **_guard(got_guard),
                    "recover_veto": "", "recover_used": True, "recover_chain": by}, weights,
                   {"trial": str(trial), "method": by, "steps": str(steps),
                    "exact": json.dumps(exact)})


def vetoed(now_kl: float, got_kl: float, now_guard: float | None = None,
           got_guard: float | None = None) -> str:
    """The keep rule: why recovered weights are not kept ("" when they are). "holdout": no
    closer to the base model (KL) on the held-out calibration windows than the weights the
    point has; "guard": further from it on the guard text (a third domain). Fitting the
    calibration domain at the cost of others shows there (docs/recovery.md)."""
    if not got_kl < now_kl:
        return "holdout"
    if now_guard is not None and got_guard is not None and not got_guard <= now_guard:
        return "guard"
    return ""


def _guard(kl: float | None) -> dict:
    return {} if kl is None else {GUARD_KL: kl}


def save_outcome(run_dir: Path, trial: int, outcome: Outcome) -> dict:
    """Write a kept outcome's weights to `recover/trial-N.safetensors` (atomically); its
    columns, for the study."""
    from safetensors.torch import save_file

    from llmpareto import atomic

    if outcome.weights is not None:
        path = weights_path(run_dir, trial)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            save_file(outcome.weights, str(tmp), metadata=outcome.meta)
    return outcome.columns


def _out_of_memory(bench, trial: int, method: str):
    from llmpareto.errors import UserError
    from llmpareto.units import format_bytes

    dev = next(bench.model.parameters()).device
    got = ""
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        got = (f" ({format_bytes(torch.cuda.max_memory_allocated(dev))} allocated at the peak, "
               f"{format_bytes(free)} free of {format_bytes(total)})")
    s = bench.settings
    return UserError(f"recovery of trial {trial} ({method}) ran out of {dev} memory{got} with "
                     f"--recover-tokens {s.recover_tokens} and --batch-size {s.batch_size}; "
                     "every point recovered so far is kept: --resume with a lower "
                     "--recover-tokens, or with --torch-device cpu")


def use_recovered(bench, recipe: Recipe, weights: dict[str, torch.Tensor], exact: bool):
    """Apply `recipe` with recovered `weights` in place of the base ones (the built model)."""
    from llmpareto.compress import apply

    set_start(bench, recipe, weights, exact)
    apply(bench.model, recipe, bench.cache)


def load_recovered(run_dir: Path, trial: int) -> tuple[dict[str, torch.Tensor], bool] | None:
    """A trial's recovered weights and whether they lie on their grids, or None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = weights_path(run_dir, trial)
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        exact = json.loads((f.metadata() or {}).get("exact", "false"))
    return load_file(str(path)), bool(exact)
