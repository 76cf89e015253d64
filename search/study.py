"""Opening the Optuna study of a run, and the run.json record of how it was made."""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import time
import warnings

import optuna
from sqlalchemy.exc import IntegrityError, OperationalError

from llmpareto.errors import UserError
from llmpareto.rundir import RunDir
from llmpareto.search.settings import SearchSettings
from llmpareto.versions import package_versions

OPEN_TRIES = 5  # opening a new study.db that another process is creating at the same moment


def open_study(rd: RunDir, settings: SearchSettings, sampler: optuna.samplers.BaseSampler):
    """Create or load the run's study; a damaged study.db is reported, never overwritten."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    check_sqlite(rd)
    for attempt in range(OPEN_TRIES):
        try:
            storage = optuna.storages.RDBStorage(rd.storage_url)
            study = optuna.create_study(
                study_name=settings.study, storage=storage, sampler=sampler,
                directions=["minimize"] * len(settings.objectives), load_if_exists=True,
            )
            return name_objectives(study, settings.objectives)
        except UserError:
            raise
        except (IntegrityError, OperationalError) as exc:
            # another process (a worker, `llmpareto front`, a notebook) opened the new file at
            # the same moment and won the race to create the schema: it exists now, open again
            raced = isinstance(exc, IntegrityError) or any(
                w in str(exc) for w in ("locked", "already exists"))
            if not raced or attempt == OPEN_TRIES - 1:
                raise _damaged(rd, _first_line(exc)) from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as exc:  # noqa: BLE001 - sqlalchemy/optuna raise many kinds here
            raise _damaged(rd, _first_line(exc)) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def check_sqlite(rd: RunDir) -> None:
    """A study.db that is not an SQLite file, or fails SQLite's own consistency check, is
    reported before SQLAlchemy touches (and writes into) it."""
    import sqlite3

    if not (rd.db.exists() and rd.db.stat().st_size > 0):
        return
    with open(rd.db, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise _damaged(rd, "it is not an SQLite file")
    try:  # read-only: every page, so damage anywhere is found before a write lands beside it
        with contextlib.closing(sqlite3.connect(f"{rd.db.resolve().as_uri()}?mode=ro",
                                                uri=True, timeout=30)) as con:
            result = [r[0] for r in con.execute("PRAGMA quick_check(5)")]
    except sqlite3.Error as exc:
        raise _damaged(rd, f"{type(exc).__name__}: {exc}") from None
    if result != ["ok"]:
        raise _damaged(rd, f"SQLite's quick_check: {'; '.join(map(str, result))[:200]}")


def name_objectives(study: optuna.Study, objectives: list[str]) -> optuna.Study:
    """Name the study's values after the objectives (optuna-dashboard shows `perplexity`,
    `memory_bytes`, ... instead of "Objective 0/1"); idempotent, so --resume may repeat it."""
    if study.metric_names != list(objectives):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives))
    return study


def _strategy_info(settings: SearchSettings, population: int, planner) -> dict:
    from llmpareto.search.strategies import resolve

    out = {"name": settings.strategy, "runs": resolve(settings), "population": population,
           "seed": settings.seed, "repair": settings.repair}
    if planner is not None:
        p = planner.profile
        out.update(swept=planner.swept, sensitivity={
            "file": "sensitivity.json", "tokens": p["tokens"], "seconds": p["seconds"],
            "evaluations": p["evaluations"]})
    return out


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _damaged(rd: RunDir, why: str) -> UserError:
    if "disk is full" in why or "No space left" in why:
        return UserError(f"{rd.db} could not be written: the disk is full ({why}). Free disk "
                         f"space, then run again with --resume: completed trials are kept.")
    return UserError(
        f"{rd.db} cannot be opened as an Optuna study ({why}). Nothing was changed: move the "
        "file aside (or restore it from a backup) and run again, or choose another --study."
    )


def run_info(settings: SearchSettings, runner, population: int, planner=None) -> dict:
    return {
        "settings": settings.to_dict(),
        "model": {"source": runner.source.describe(), "n_params": runner.arch.n_params,
                  "arch": runner.arch.to_dict()},
        "text": {"n_tokens": runner.windows.n_tokens, "sha256": runner.windows.sha256,
                 "eval_windows": len(runner.windows.eval),
                 "calib_windows": len(runner.windows.calib),
                 "windows": runner.windows.record()},  # how they were cut: BOS first or not
        "space": runner.space.describe(),
        "device": runner.profile.to_dict(),
        "workload": vars(runner.workload),
        "placement": runner.placement.to_dict(),  # where trials ran: --torch-device/-dtype
        "strategy": _strategy_info(settings, population, planner),
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
