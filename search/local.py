"""Local backend: one process drives an Optuna study in SQLite with ask()/tell().

Resumable: every finished trial is in study.db the moment it is told; a trial cut off by
Ctrl-C or a kill is marked FAIL on --resume and, if it was an enqueued baseline, enqueued
again, so no completed trial is lost or repeated.
"""

from __future__ import annotations

import time
import warnings

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from llmpareto.front import Front
from llmpareto.placement import peak_device_bytes
from llmpareto.rundir import RunDir
from llmpareto.search.records import front_size, record_trial, write_outputs
from llmpareto.search.recover import after_search
from llmpareto.search.runner import TrialRunner
from llmpareto.search.session import (
    lifecycle,
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
    with warnings.catch_warnings():  # ask/tell with the storage's heartbeats on purpose: the
        # thread below writes them (Optuna warns on every ask outside Study.optimize)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed", UserWarning)
        trial = study.ask()
    recipe = runner.space.suggest(trial)
    # an RDB storage with heartbeats lets other workers fail (and retry) a trial if we die
    with get_heartbeat_thread(trial._trial_id, study._storage):
        result = runner.run(recipe)
    recipe.save(rd.recipe_path(trial.number))
    record_trial(trial, result.payload(), attrs)
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

    def n_done() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def finish(info: dict) -> None:
        info.update(recovered_trials=recovered, quantizer=runner.quantizer_info())
        c = runner.cache  # over the whole run: what trials made on first use included
        info.setdefault("cache", {}).update(
            dense_hits=c.hits, dense_misses=c.misses, prepare_total_s=c.prepare_seconds,
            bytes_end=c.nbytes, bytes_bound=c.packed_bytes, remade=c.remade,
            peak_rss_end_bytes=peak_rss_bytes(), device_bytes=c.device_nbytes,
            peak_device_bytes=peak_device_bytes(runner.placement))

    feasible = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if t.user_attrs.get("feasible"))
    with lifecycle(rd, info, settings, study) as run:
        run.at_end(finish)
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
        finally:
            bar.close()
        after_search(runner, study, rd, settings, settings.progress)
    return write_outputs(study, rd, settings.objectives)
