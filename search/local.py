"""Local backend: one process drives an Optuna study in SQLite with ask()/tell().

Resumable: every finished trial is in study.db the moment it is told; a trial cut off by
Ctrl-C or a kill is marked FAIL on --resume and, if it was an enqueued baseline, enqueued
again, so no completed trial is lost or repeated.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import optuna
from optuna.trial import TrialState

from llmpareto.errors import UserError
from llmpareto.front import Front
from llmpareto.rundir import RunDir
from llmpareto.search.records import BASELINE_ATTR, write_outputs
from llmpareto.search.runner import TrialRunner
from llmpareto.search.samplers import default_population, make_sampler
from llmpareto.search.study import open_study, run_info
from llmpareto.settings import SearchSettings


@contextmanager
def _emissions(country: str):
    """Energy and CO2 of the search itself (codecarbon, offline: never a network call)."""
    out: dict = {}
    tracker = None
    try:
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        tracker = OfflineEmissionsTracker(country_iso_code=country, output_methods=[],
                                          log_level="error", tracking_mode="process")
        tracker.start()
    except Exception as exc:  # noqa: BLE001 - measuring must never stop a search
        out["error"] = f"codecarbon unavailable: {exc}"
    try:
        yield out
    finally:
        if tracker is not None:
            try:
                tracker.stop()
                d = tracker.final_emissions_data
                out.update(energy_kwh=float(d.energy_consumed), co2_kg=float(d.emissions),
                           duration_s=float(d.duration), country=country,
                           tool="codecarbon OfflineEmissionsTracker")
            except Exception as exc:  # noqa: BLE001
                out["error"] = f"codecarbon failed: {exc}"


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed process FAIL; re-enqueue fixed (baseline) ones."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        fixed = t.system_attrs.get("fixed_params")
        if fixed:
            study.enqueue_trial(fixed, user_attrs=dict(t.user_attrs), skip_if_exists=False)
    return len(stale)


def _enqueue_baselines(study: optuna.Study, runner: TrialRunner) -> None:
    for label, params in runner.space.baselines():
        study.enqueue_trial(params, user_attrs={BASELINE_ATTR: label}, skip_if_exists=True)


def _progress(settings: SearchSettings, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=settings.trials, initial=done, desc="trials", unit="trial",
                disable=not settings.progress, dynamic_ncols=True)


def run_one(study: optuna.Study, runner: TrialRunner, rd: RunDir, objectives: list[str]) -> bool:
    """Ask, evaluate, tell one trial. Returns whether it was feasible."""
    trial = study.ask()
    recipe = runner.space.suggest(trial)
    result = runner.run(recipe)
    recipe.save(rd.recipe_path(trial.number))
    for key, value in result.constraints.items():
        trial.set_constraint(key, value)
    for key, value in result.metrics.items():
        trial.set_user_attr(key, value if math.isfinite(value) else None)
    for key, value in result.seconds.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("feasible", result.feasible)
    if result.reused:
        trial.set_user_attr("reused", True)
    study.tell(trial, [result.metrics[o] for o in objectives])
    return result.feasible


def run_local(settings: SearchSettings) -> Front:
    rd = RunDir.for_study(settings.runs_dir, settings.study)
    if rd.exists() and not settings.resume:
        raise UserError(f"{rd.path} already exists; pass --resume to continue it, or choose "
                        "another --study name")
    if settings.resume and not rd.exists():
        raise UserError(f"--resume: no run at {rd.path}; check --study and --runs-dir")
    if settings.resume:
        _check_same_settings(rd, settings)
    t_load = time.perf_counter()
    runner = TrialRunner(settings)
    load_s = time.perf_counter() - t_load
    rd.create()
    population = settings.population or default_population(settings.trials)
    sampler = make_sampler(settings.sampler, settings.seed, population, settings.trials)
    study = open_study(rd, settings, sampler)
    recovered = _recover_interrupted(study) if settings.resume else 0
    if not settings.resume and settings.baselines:
        _enqueue_baselines(study, runner)
    info = run_info(settings, runner, population)
    info["load_s"] = load_s
    rd.write_json(rd.run_json, {**info, "status": "running"})

    def n_done() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    feasible = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if t.user_attrs.get("feasible"))
    status = "finished"
    with _emissions(settings.country) as energy:
        t0, rss0 = time.perf_counter(), _peak_rss_bytes()
        runner.cache.prepare(runner.prepare_pairs())
        info["cache"] = {"prepare_s": time.perf_counter() - t0, "bytes": runner.cache.nbytes,
                         "peak_rss_before_bytes": rss0, "peak_rss_after_bytes": _peak_rss_bytes()}
        bar = _progress(settings, n_done())
        try:
            while n_done() < settings.trials:
                feasible += run_one(study, runner, rd, settings.objectives)
                bar.update(1)
                front_size = len(study.best_trials) if feasible else 0
                bar.set_postfix(feasible=feasible, front=front_size)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            bar.close()
    info["cache"].update(dense_hits=runner.cache.hits, dense_misses=runner.cache.misses)
    info.update(status=status, search_energy=energy, recovered_trials=recovered,
                completed_trials=n_done())
    rd.write_json(rd.run_json, info)
    front = write_outputs(study, rd, settings.objectives)
    if status == "interrupted":
        print(f"interrupted: {n_done()} completed trials are kept in {rd.db}; continue with "
              f"--study {settings.study} --resume")
    return front


def _check_same_settings(rd: RunDir, settings: SearchSettings) -> None:
    old = SearchSettings.from_dict(rd.read_run_json()["settings"]).identity()
    new = settings.identity()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise UserError(
            f"--resume {rd.path}: settings differ from the original run ({detail}). Resume with "
            "the original settings (see run.json), or start a new --study."
        )
