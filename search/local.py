"""Local backend: one process drives an Optuna study in SQLite with ask()/tell().

Resumable: every finished trial is in study.db the moment it is told; a trial cut off by
Ctrl-C or a kill is marked FAIL on --resume and, if it was an enqueued baseline, enqueued
again, so no completed trial is lost or repeated.
"""

from __future__ import annotations

import math
import time

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from llmpareto.front import Front
from llmpareto.placement import peak_device_bytes
from llmpareto.rundir import RunDir
from llmpareto.search.records import front_size, write_outputs
from llmpareto.search.runner import TrialRunner
from llmpareto.search.session import (
    emissions,
    open_run,
    peak_rss_bytes,
    prepare_run_dir,
)
from llmpareto.search.settings import SearchSettings


def _progress(settings: SearchSettings, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=settings.trials, initial=done, desc="trials", unit="trial",
                disable=not settings.progress, dynamic_ncols=True)


def run_one(study: optuna.Study, runner: TrialRunner, rd: RunDir, objectives: list[str],
            attrs: dict | None = None) -> bool:
    """Ask, evaluate, tell one trial. Returns whether it was feasible."""
    trial = study.ask()
    recipe = runner.space.suggest(trial)
    # an RDB storage with heartbeats lets other workers fail (and retry) a trial if we die
    with get_heartbeat_thread(trial._trial_id, study._storage):
        result = runner.run(recipe)
    recipe.save(rd.recipe_path(trial.number))
    for key, value in (attrs or {}).items():
        trial.set_user_attr(key, value)
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
    if settings.storage:  # a shared RDB study: this process is one worker among several
        from llmpareto.search.rdb import run_rdb

        return run_rdb(settings)
    rd = prepare_run_dir(settings)
    t_load = time.perf_counter()
    runner = TrialRunner(settings)
    load_s = time.perf_counter() - t_load
    study, info, recovered = open_run(settings, runner, rd)
    info["load_s"] = load_s
    runner.write_imatrix(rd.path / "imatrix.gguf")
    rd.write_json(rd.run_json, {**info, "status": "running"})

    def n_done() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    feasible = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if t.user_attrs.get("feasible"))
    status = "finished"
    with emissions(settings.country) as energy:
        t0, rss0 = time.perf_counter(), peak_rss_bytes()
        runner.prepare(settings.progress)
        info["cache"] = {"prepare_s": time.perf_counter() - t0, "bytes": runner.cache.nbytes,
                         "peak_rss_before_bytes": rss0, "peak_rss_after_bytes": peak_rss_bytes()}
        bar = _progress(settings, n_done())
        try:
            while n_done() < settings.trials:
                feasible += run_one(study, runner, rd, settings.objectives)
                # a run killed or stopped mid-way leaves its trials and front so far on disk
                write_outputs(study, rd, settings.objectives, plot=False)
                bar.update(1)
                bar.set_postfix(feasible=feasible, front=front_size(study) if feasible else 0)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            bar.close()
    c = runner.cache  # over the whole run: what trials made on first use included
    info["cache"].update(dense_hits=c.hits, dense_misses=c.misses, prepare_total_s=c.prepare_seconds,
                         bytes_end=c.nbytes, bytes_bound=c.packed_bytes, remade=c.remade,
                         peak_rss_end_bytes=peak_rss_bytes(), device_bytes=c.device_nbytes,
                         peak_device_bytes=peak_device_bytes(runner.placement))
    info.update(status=status, search_energy=energy, recovered_trials=recovered,
                completed_trials=n_done(), quantizer=runner.quantizer_info())
    rd.write_json(rd.run_json, info)
    front = write_outputs(study, rd, settings.objectives)
    if status == "interrupted":
        print(f"interrupted: {n_done()} completed trials are kept in {rd.db}; continue with "
              f"--study {settings.study} --resume")
    return front
