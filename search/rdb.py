"""Shared-RDB backend: `llmpareto search --storage URL` and `llmpareto worker` processes, on one
machine or many, run the trials of one Optuna study kept in PostgreSQL (any SQLAlchemy URL).

The study holds the search settings (a user attr), so a worker needs only the study name and
the URL. Heartbeats let the survivors fail a dead worker's trial and re-enqueue it if it was a
baseline, so the search still finishes.
"""

from __future__ import annotations

import datetime
import time
import warnings

import optuna
from optuna.trial import TrialState

from llmpareto.errors import UserError
from llmpareto.front import Front
from llmpareto.rundir import RunDir
from llmpareto.search.local import run_one
from llmpareto.search.runner import TrialRunner
from llmpareto.search.samplers import default_population
from llmpareto.search.session import (
    WINDOWS_ATTR,
    check_same_settings,
    check_same_windows,
    enqueue_baselines,
    fail_stale,
    lifecycle,
    local_node,
    n_complete,
    requeue_if_fixed,
    write_distributed_outputs,
)
from llmpareto.search.settings import SearchSettings
from llmpareto.search.strategies import enqueue_seeds, make_sampler, plan
from llmpareto.search.study import name_objectives, run_info

SETTINGS_ATTR = "llmpareto_settings"  # study user attr: the settings every worker searches with
PROFILE_ATTR = "llmpareto_sensitivity"  # study user attr: the sensitivity profile, measured once
HEARTBEAT_S = 5  # a running trial's worker writes a heartbeat this often
GRACE_S = 30  # ... and is presumed dead after this long without one
POLL_S = 1.0
STARTED_ATTR = "llmpareto:heartbeat_from_ask"  # system attr: the trial's first heartbeat is in
_LOCAL_ONLY = ("storage", "address", "resume", "create_only", "runs_dir", "progress")


def masked(url: str) -> str:
    """The URL as error messages and run.json show it: the password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: show it as given
        return url


def connect(url: str) -> optuna.storages.RDBStorage:
    """Open the storage or fail fast, naming the URL tried (password hidden) and what to do."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"--storage {url!r} is not a SQLAlchemy URL; use e.g. "
                        "postgresql://user:password@host:5432/dbname") from None
    dialect = parsed.get_backend_name()
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername=_pg_driver()).render_as_string(hide_password=False)
    # libpq waits minutes for an unroutable host by default; a worker should fail in seconds
    engine = {"connect_args": {"connect_timeout": 10}} if dialect == "postgresql" else {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=requeue_if_fixed)
    except ImportError as exc:
        raise UserError(f"--storage {masked(url)}: the database driver is not installed ({exc});"
                        " pip install psycopg2-binary (PostgreSQL) or pymysql (MySQL)") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many kinds here
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"--storage {masked(url)}: cannot open the database ({why}). Check the "
                        "host, port, user, password and database name, and that the server "
                        "accepts connections from this machine.") from None


def _pg_driver() -> str:
    """SQLAlchemy 2.1 maps postgresql:// to psycopg 3, 2.0 to psycopg2: use whichever is here."""
    import importlib.util

    for module, driver in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return driver
    return "postgresql"  # the ImportError below then names what to install


def _load(storage, name: str, sampler=None) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        return None


def _stored_settings(study: optuna.Study, url: str) -> dict:
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if not isinstance(stored, dict):
        raise UserError(f"study {study.study_name!r} in {masked(url)} was not made by llmpareto "
                        "(it holds no search settings); choose another --study")
    return stored


def _shared(settings: SearchSettings) -> dict:
    """Settings as workers see them: connection and this process's paths left out."""
    d = settings.to_dict()
    for key in _LOCAL_ONLY:
        d.pop(key)
    return d


def run_rdb(settings: SearchSettings) -> Front:
    """Create (or --resume) the shared study, then work on it like any worker."""
    url, name = settings.storage, settings.study
    storage = connect(url)
    existing = _load(storage, name)
    where = f"--storage {masked(url)} --study {name}"
    if existing is not None:
        check_same_settings(_stored_settings(existing, url), settings, where)
        if not settings.resume:
            raise UserError(f"{where} already exists; pass --resume to continue it, add "
                            f"workers with `llmpareto worker {where}`, or choose another --study")
    elif settings.resume:
        raise UserError(f"--resume: no study {name!r} in {masked(url)}; check --study/--storage")
    runner = TrialRunner(settings)
    if existing is not None:
        check_same_windows(existing.user_attrs.get(WINDOWS_ATTR), runner.windows, where)
    population = settings.population or default_population(settings.trials)
    rd = RunDir.for_study(settings.runs_dir, name)
    rd.create()
    planner = plan(settings, runner, rd.path,
                   existing.user_attrs.get(PROFILE_ATTR) if existing is not None else None,
                   settings.progress)
    sampler = make_sampler(settings, runner, planner, population)
    if existing is None:
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                        directions=["minimize"] * len(settings.objectives))
            name_objectives(study, settings.objectives)
        except optuna.exceptions.DuplicatedStudyError:
            raise UserError(f"{where} was just created by another process; pass --resume "
                            "or start a `llmpareto worker`") from None
        if planner is not None:
            study.set_user_attr(PROFILE_ATTR, planner.profile)
        presets = runner.preset_baselines() if settings.baselines else []
        n = enqueue_baselines(study, runner.space, presets, settings.trials) \
            if settings.baselines else 0
        enqueue_seeds(study, settings, planner, n, presets)
    else:
        study = _load(storage, name, sampler)
        fail_stale(study)  # not every RUNNING trial: other workers may be alive
    study.set_user_attr(SETTINGS_ATTR, _shared(settings))  # --resume may raise --trials
    study.set_user_attr(WINDOWS_ATTR, runner.windows.record())
    info = run_info(settings, runner, population, planner)
    info["settings"]["storage"] = masked(url)
    if settings.create_only:
        rd.write_json(rd.run_json, {**info, "status": "created"})
        print(f"study {name} is ready in {masked(url)}; start workers with "
              f"`llmpareto worker --study {name} --storage URL`")
        return write_distributed_outputs(study, rd, settings.objectives, runner.space)
    if not settings.recover_steps:
        front = _work(study, runner, rd, settings, info)[0]
        if settings.eval_text != "none":  # measured here, once every worker's trials are in
            from llmpareto.search.recover import after_search

            after_search(runner, study, rd, settings, settings.progress)
            front = write_distributed_outputs(study, rd, settings.objectives, runner.space)
        return front
    # recovery: this process coordinates it (search/rdb_recover.py), from its first trial so
    # that workers whose trials end first wait for its rounds; they recover points with it
    from llmpareto.search.rdb_recover import Board, pool
    from llmpareto.search.recover import after_search

    board = Board(study)
    with board.coordinating():
        _work(study, runner, rd, settings, info)
        after_search(runner, study, rd, settings, settings.progress,
                     pool=pool(board, claims=settings.recover_here))
    return write_distributed_outputs(study, rd, settings.objectives, runner.space)


def run_worker(name: str, url: str, runs_dir: str = "runs", progress: bool = True,
               torch_device: str | None = None) -> int:
    """Join an existing study; returns how many trials this process ran. `torch_device`
    picks this worker's GPU (cuda:N); None: the study's --torch-device."""
    storage = connect(url)
    found = _load(storage, name)
    if found is None:
        names = sorted(optuna.get_all_study_names(storage))
        raise UserError(f"no study {name!r} in {masked(url)} (there: {', '.join(names) or 'none'})"
                        f"; create it first with `llmpareto search --storage URL --study {name} "
                        "--create-only ...`")
    stored = _stored_settings(found, url)
    settings = SearchSettings.from_dict({**stored, "storage": url, "resume": True,
                                         "runs_dir": runs_dir, "progress": progress,
                                         **({"torch_device": torch_device} if torch_device
                                            else {})})
    runner = TrialRunner(settings)
    check_same_windows(found.user_attrs.get(WINDOWS_ATTR), runner.windows,
                       f"llmpareto worker --study {name}")
    population = settings.population or default_population(settings.trials)
    rd = RunDir.for_study(runs_dir, name)
    rd.create()
    planner = plan(settings, runner, rd.path, found.user_attrs.get(PROFILE_ATTR),
                   settings.progress)
    study = _load(storage, name, make_sampler(settings, runner, planner, population))
    info = run_info(settings, runner, population, planner)
    info["settings"]["storage"] = masked(url)
    here = _work(study, runner, rd, settings, info)[1]
    if settings.recover_steps:  # then the coordinator's recovery, with it (rdb_recover.py)
        from llmpareto.search.rdb_recover import serve

        print(f"worker recovered {serve(study, runner, settings)} points here")
    return here


def _target(study: optuna.Study) -> int:
    return int(study.user_attrs[SETTINGS_ATTR]["trials"])


def _running(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def heartbeat_from_ask(study: optuna.Study) -> None:
    """A trial's first heartbeat is written inside `study.ask()` (the sampler's before_trial,
    before any proposal is computed), and the trial marked so: optuna's heartbeat thread starts
    only after ask, and a worker killed while a sampler proposes (seconds for evolve's screens)
    would leave a RUNNING trial that never goes stale."""
    sampler, storage = study.sampler, study._storage
    inner = sampler.before_trial

    def before_trial(study_: optuna.Study, trial) -> None:
        storage.record_heartbeat(trial._trial_id)
        storage.set_trial_system_attr(trial._trial_id, STARTED_ATTR, True)
        inner(study_, trial)

    sampler.before_trial = before_trial


def fail_orphans(study: optuna.Study) -> int:
    """Fail (and requeue, if fixed) RUNNING trials with no first heartbeat that started over
    GRACE_S ago: their worker died between creating the trial and its before_trial."""
    now = datetime.datetime.now()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if STARTED_ATTR in t.system_attrs or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() > GRACE_S:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            requeue_if_fixed(study, t)
            n += 1
    return n


def _work(study, runner: TrialRunner, rd: RunDir, settings: SearchSettings, info: dict):
    """Run trials until the study holds its --trials completed ones, then write the run."""
    from tqdm.auto import tqdm

    heartbeat_from_ask(study)

    attrs, here = {**local_node(), **runner.where()}, 0
    with lifecycle(rd, info, settings, study, kept_in=masked(settings.storage)) as run:
        run.at_end(lambda info: info.update(trials_here=here))
        runner.prepare(settings.progress)
        bar = tqdm(total=_target(study), initial=n_complete(study), desc="trials", unit="trial",
                   disable=not settings.progress, dynamic_ncols=True)
        try:
            while True:
                fail_stale(study)
                fail_orphans(study)
                done, target = n_complete(study), _target(study)
                if done >= target and not _running(study):
                    break
                if done + _running(study) >= target:
                    time.sleep(POLL_S)  # the last trials are running elsewhere: wait for them
                    continue
                run_one(study, runner, rd, settings.objectives, attrs)
                here += 1
                bar.update(n_complete(study) - bar.n)
        finally:  # interrupted: our trial stays RUNNING until its heartbeat goes stale
            bar.close()
    return write_distributed_outputs(study, rd, settings.objectives, runner.space), here
