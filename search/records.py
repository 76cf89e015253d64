"""From an Optuna study to the run directory's files: trials.csv, front.csv/json, front.png.

Shared by every backend, so a local run and a distributed one write the same columns.
"""

from __future__ import annotations

import math

import optuna
import pandas as pd

from llmpareto import atomic
from llmpareto.front import Front
from llmpareto.metrics import EXTRA_COLUMNS, METRICS
from llmpareto.rundir import RunDir

BASELINE_ATTR = "baseline"  # user attr holding the label of an enqueued uniform recipe
# user attr of a baseline the space's parameters cannot express (a llama.cpp preset mixes types
# within a group): its whole recipe, which every backend evaluates instead of the params
RECIPE_ATTR = "recipe"
SEED_ATTR = "seed"  # user attr of an enqueued strategy proposal (a knapsack allocation)
# study user attr: trial number -> columns measured after the search (distilled_perplexity, ...),
# so trials.csv and the front keep them when they are rewritten from the study
AFTER_ATTR = "llmpareto_after_search"


def record_trial(trial, payload: dict, attrs: dict | None = None) -> None:
    """Store one scored trial (`TrialResult.payload()`, and `attrs` such as where it ran) on
    an Optuna trial: the one function every backend records with, so trials.csv has the same
    columns whoever ran it."""
    for key, value in (attrs or {}).items():
        trial.set_user_attr(key, value)
    for key, value in payload["constraints"].items():
        trial.set_constraint(key, value)
    for key, value in {**payload["metrics"], **payload["seconds"]}.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("feasible", payload["feasible"])
    if payload["reused"]:
        trial.set_user_attr("reused", True)


def record_after_search(study: optuna.Study, trial: int, values: dict[str, float]) -> None:
    """Store columns measured after the search (e.g. by `distill`) for `trial` in the study."""
    got = dict(study.user_attrs.get(AFTER_ATTR, {}))
    got[str(trial)] = {**got.get(str(trial), {}), **values}
    study.set_user_attr(AFTER_ATTR, got)


def trials_frame(study: optuna.Study, rd: RunDir) -> pd.DataFrame:
    rows = []
    after = study.user_attrs.get(AFTER_ATTR, {})
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        row = {
            "trial": t.number,
            "state": t.state.name,
            "feasible": bool(ua.get("feasible", False)),
            "baseline": ua.get(BASELINE_ATTR, ""),
        }
        for m in (*METRICS, *EXTRA_COLUMNS):
            v = ua.get(m)
            row[m] = float(v) if v is not None and math.isfinite(float(v)) else float("nan")
        row["duration_s"] = t.duration.total_seconds() if t.duration else float("nan")
        row["recipe"] = str(rd.recipe_path(t.number).relative_to(rd.path)) \
            if rd.recipe_path(t.number).exists() else ""
        row.update({f"param:{k}": v for k, v in t.params.items()})
        row.update(after.get(str(t.number), {}))
        rows.append(row)
    cols = ["trial", "state", "feasible", "baseline", *METRICS, *EXTRA_COLUMNS, "duration_s",
            "recipe"]
    return pd.DataFrame(rows, columns=cols if not rows else None)


def front_size(study: optuna.Study) -> int:
    """Front points as the printed front counts them: a recipe the sampler proposed several
    times is one point (Front.from_trials drops the repeats the same way)."""
    feasible = [t for t in study.best_trials if t.user_attrs.get("feasible")]
    return len({(tuple(sorted(t.params.items())), tuple(t.values)) for t in feasible})


def write_outputs(study: optuna.Study, rd: RunDir, objectives: list[str],
                  plot: bool = True) -> Front:
    """Rewrite trials.csv and the front files from the study (the source of truth); front.png
    only with `plot` (a local search rewrites the rest after every trial, the picture at the
    end)."""
    trials = trials_frame(study, rd)
    with atomic.atomic_path(rd.trials_csv) as tmp:
        trials.to_csv(tmp, index=False)
    front = Front.from_trials(trials, objectives, rd.path)
    front.to_csv(rd.front_csv)
    rd.write_json(rd.front_json, {"objectives": objectives, "points": front.to_records()})
    if plot and len(trials):
        front.plot(rd.front_png, title=f"{rd.path.name}: Pareto front")
    return front
