"""What every backend does around its trials: energy accounting, settings checks on --resume,
baselines, recovery of trials cut off by a kill, and the run directory written from a study.
"""

from __future__ import annotations

import logging
import socket
import sys
import warnings
from contextlib import contextmanager

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmpareto import atomic
from llmpareto.errors import UserError
from llmpareto.front import Front
from llmpareto.rundir import RunDir
from llmpareto.search.records import (
    BASELINE_ATTR,
    RECIPE_ATTR,
    SEED_ATTR,
    trials_frame,
    write_outputs,
)
from llmpareto.search.settings import SearchSettings
from llmpareto.spaces.base import recipe_of

# User attrs naming who ran a trial and where (distributed backends: node, the torch device
# and dtype its model was on, and the share of the node's memory its caches planned on);
# they become trials.csv columns.
NODE_COLUMNS = ("node", "node_ip", "torch_device", "torch_dtype", "memory_share")


def _no_energy(out: dict) -> None:
    """Energy that could not be measured is said once, not left for run.json alone to show."""
    print(f"llmpareto: note: the search's energy and CO2 are missing from run.json "
          f"({out['error']})", file=sys.stderr, flush=True)


@contextmanager
def emissions(country: str):
    """Energy and CO2 of the search itself (codecarbon, offline: never a network call). When
    codecarbon cannot measure, run.json holds {"error": why} and one note line says so."""
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
        _no_energy(out)
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
                if not (out["energy_kwh"] >= 0 and out["co2_kg"] >= 0):  # NaN or negative
                    raise ValueError(f"it returned {out['energy_kwh']} kWh")
            except Exception as exc:  # noqa: BLE001
                for key in ("energy_kwh", "co2_kg", "duration_s"):
                    out.pop(key, None)
                out["error"] = f"codecarbon failed: {exc}"
                _no_energy(out)


class Run:
    """A run while its trials go (what `lifecycle` yields): its run.json `info`, the `status`
    it will end with, and what to add to `info` at the end."""

    def __init__(self, info: dict) -> None:
        self.info, self.status = info, "finished"
        self._at_end: list = []

    def at_end(self, fn) -> None:
        """Call `fn(info)` when the run ends, before run.json is written (also after Ctrl-C)."""
        self._at_end.append(fn)


@contextmanager
def lifecycle(rd: RunDir, info: dict, settings: SearchSettings, study: optuna.Study,
              kept_in: str | None = None):
    """One run's life, the same for the local, shared-RDB and Ray backends: run.json says
    "running"; the search's own energy is measured; Ctrl-C ends it as "interrupted" with every
    completed trial kept; at the end run.json holds the status, the energy and the completed
    trials (the backend then writes the front from the study)."""
    run = Run(info)
    rd.write_json(rd.run_json, {**info, "status": "running"})
    with emissions(settings.country) as energy:
        try:
            yield run
        except KeyboardInterrupt:
            run.status = "interrupted"
    for fn in run._at_end:
        fn(info)
    info.update(status=run.status, search_energy=energy, completed_trials=n_complete(study))
    rd.write_json(rd.run_json, info)
    if run.status == "interrupted":
        print(f"interrupted: {n_complete(study)} completed trials are kept in "
              f"{kept_in or rd.db}; continue with --study {settings.study} --resume")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def requeue_if_fixed(study: optuna.Study, trial: FrozenTrial) -> None:
    """A failed baseline must still run once: enqueue its fixed params again."""
    fixed = trial.system_attrs.get("fixed_params")
    if fixed:
        study.enqueue_trial(fixed, user_attrs={k: v for k, v in trial.user_attrs.items()
                                               if k in (BASELINE_ATTR, RECIPE_ATTR,
                                                        SEED_ATTR)},
                            skip_if_exists=False)


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed process FAIL; re-enqueue fixed (baseline) ones."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        requeue_if_fixed(study, t)
    return len(stale)


def fail_stale(study: optuna.Study) -> None:
    """Fail trials whose worker stopped sending heartbeats (RDB storage with heartbeats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def enqueue_baselines(study: optuna.Study, space, recipes: list | None = None,
                      trials: int | None = None) -> int:
    """The space's uniform baselines, then `recipes`: (label, closest params, Recipe) of
    baselines outside the space (llama.cpp's presets), evaluated by their whole recipe.
    Idempotent: a label the study holds already (in any state) is not enqueued again.
    Says so when `trials` (the run's) leaves nothing to search. Returns how many baselines
    the run has."""
    present = {t.user_attrs.get(BASELINE_ATTR) for t in study.get_trials(deepcopy=False)}
    for label, params in space.baselines():
        if label not in present:
            study.enqueue_trial(params, user_attrs={BASELINE_ATTR: label}, skip_if_exists=True)
    for label, params, recipe in recipes or []:
        if label not in present:
            study.enqueue_trial(params, user_attrs={BASELINE_ATTR: label,
                                                    RECIPE_ATTR: recipe.to_dict()})
    n = len(space.baselines()) + len(recipes or [])
    if trials is not None and trials <= n:
        print(f"llmpareto: note: --trials {trials} runs baselines only ({min(trials, n)} of "
              f"the {n} uniform recipes and llama.cpp presets); nothing is searched: "
              f"--trials {n + 10} searches 10 points, --presets none or --no-baselines "
              "enqueue fewer", file=sys.stderr)
    return n


def check_same_settings(old_dict: dict, settings: SearchSettings, where: str) -> None:
    # runs from before --torch-dtype ran in float32; `auto` takes what the run resolved to
    old_dict = {"torch_dtype": "float32", **old_dict}
    if settings.torch_dtype == "auto":
        settings.torch_dtype = old_dict["torch_dtype"]
    old = SearchSettings.from_dict(old_dict).identity()
    new = settings.identity()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise UserError(
            f"{where}: settings differ from the original run ({detail}). Resume with "
            "the original settings (see run.json), or start a new --study."
        )


WINDOWS_ATTR = "llmpareto_windows"  # study user attr: how the shared study's windows were cut


def check_same_windows(old: dict | None, windows, where: str) -> None:
    """Refuse to add trials scored on other tokens: a run made before windows started with
    the model's BOS (no record: no BOS), or with another BOS, is not comparable."""
    from llmpareto.text import window_record

    before = old if old is not None else window_record(None)
    if before != windows.record():
        theirs = before.get("bos_token_id")
        raise UserError(
            f"{where}: this run's trials were scored on windows "
            f"{'without a BOS token' if theirs is None else f'starting with token {theirs}'}, "
            f"and this model runs with "
            f"{'no BOS' if windows.bos is None else f'BOS {windows.bos} first'} (llmpareto now "
            "cuts windows as the model runs); its numbers are not comparable: start a new "
            "--study")


def prepare_run_dir(settings: SearchSettings) -> RunDir:
    """The run directory for `settings`, refusing a clash (exists without --resume, missing
    with it) and a --resume whose settings differ from the original run's."""
    rd = RunDir.for_study(settings.runs_dir, settings.study)
    if rd.is_stub() and not settings.resume:  # a new run refused before its study existed
        rd.run_json.unlink()
    if rd.exists() and not settings.resume:
        raise UserError(f"{rd.path} already exists; pass --resume to continue it, or choose "
                        "another --study name")
    if settings.resume and not rd.exists():
        raise UserError(f"--resume: no run at {rd.path}; check --study and --runs-dir")
    if settings.resume:
        check_same_settings(rd.read_run_json()["settings"], settings, f"--resume {rd.path}")
    else:  # first thing on disk: a run killed during its model load can be resumed
        try:
            rd.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run directory {rd.path} ({exc.strerror}); "
                            f"choose another --runs-dir") from None
        rd.write_json(rd.run_json, {"settings": settings.to_dict(), "status": "starting"})
    return rd


def open_run(settings: SearchSettings, runner, rd: RunDir):
    """Create the run directory and its study (sampler, recovery of cut-off trials on
    --resume, baselines on a new run); returns (study, run.json info, recovered count)."""
    from llmpareto.search.samplers import default_population
    from llmpareto.search.strategies import enqueue_seeds, make_sampler, plan
    from llmpareto.search.study import open_study, run_info

    rd.create()
    if settings.resume:
        old = rd.read_run_json()
        if "text" in old:  # a run killed before it stored anything has scored nothing
            check_same_windows(old["text"].get("windows"), runner.windows,
                               f"--resume {rd.path}")
    population = settings.population or default_population(settings.trials)
    planner = plan(settings, runner, rd.path, progress=settings.progress)
    study = open_study(rd, settings, make_sampler(settings, runner, planner, population))
    recovered = recover_interrupted(study) if settings.resume else 0
    # on --resume too: a run killed while enqueueing gets the rest (each label once)
    presets = runner.preset_baselines() if settings.baselines else []
    n = enqueue_baselines(study, runner.space, presets, settings.trials) \
        if settings.baselines else 0
    enqueue_seeds(study, settings, planner, n, presets)
    return study, run_info(settings, runner, population, planner), recovered


def n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def local_node() -> dict[str, str]:
    """Who runs trials in this process, for an RDB worker: host:pid and the host's address."""
    import os

    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        ip = ""
    return {"node": f"{host}:{os.getpid()}", "node_ip": ip}


def write_distributed_outputs(study: optuna.Study, rd: RunDir, objectives: list[str],
                              space) -> Front:
    """The local run's files, plus the node that ran each trial; recipes are rebuilt from
    params (workers on other machines wrote theirs to their own disks)."""
    rd.create()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for t in complete:
        if not rd.recipe_path(t.number).exists():
            recipe_of(space, t.params, t.user_attrs).save(rd.recipe_path(t.number))
    if complete:  # front.png as a local run draws it (nothing to draw before any trial)
        write_outputs(study, rd, objectives)
    trials = trials_frame(study, rd)
    attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}
    at = list(trials.columns).index("recipe") + 1
    for i, col in enumerate(NODE_COLUMNS):
        trials.insert(at + i, col, [attrs[n].get(col, "") for n in trials["trial"]])
    with atomic.atomic_path(rd.trials_csv) as tmp:
        trials.to_csv(tmp, index=False)
    front = Front.from_trials(trials, objectives, rd.path)
    front.to_csv(rd.front_csv)
    rd.write_json(rd.front_json, {"objectives": objectives, "points": front.to_records()})
    return front
