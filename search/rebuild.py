"""`llmpareto front RUN --rebuild`: the run directory's files written again from study.db, the
source of truth (trials.csv, front.csv/json/png, missing or damaged recipes/<n>.json).

Needs the run's model config (for the recipe of a trial) but no weights and no text.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from llmpareto.errors import UserError
from llmpareto.front import Front
from llmpareto.rundir import RunDir
from llmpareto.search.settings import SearchSettings


def _recipe_ok(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _open(rd: RunDir, settings: SearchSettings, storage: str | None) -> optuna.Study:
    from llmpareto.search.study import check_sqlite

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or settings.storage
    if url is None:
        if not rd.db.is_file():
            raise UserError(f"{rd.path} has no study.db: nothing to rebuild from (the CSV, JSON "
                            f"and PNG files are made from it)")
        check_sqlite(rd)
        url = rd.storage_url
    elif "***" in url:
        raise UserError(f"{rd.path} keeps its trials in a shared database whose password "
                        f"run.json does not store: pass --storage URL")
    try:
        return optuna.load_study(study_name=settings.study, storage=url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/optuna raise many kinds here
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read study {settings.study!r} from {url if storage else rd.db}"
                        f" ({first}); restore study.db from a backup, or pass --storage URL "
                        f"for a shared study") from None


def rebuild(run_dir: str | Path, storage: str | None = None) -> tuple[Front, int]:
    """Rewrite `run_dir`'s outputs from its study; returns (front, recipes written)."""
    from llmpareto.models import load_arch
    from llmpareto.search.records import write_outputs
    from llmpareto.search.runner import space_for
    from llmpareto.search.session import NODE_COLUMNS, write_distributed_outputs

    rd = RunDir(Path(run_dir))
    settings = SearchSettings.from_dict(rd.read_run_json()["settings"])
    study = _open(rd, settings, storage)
    rd.create()
    space = space_for(settings, load_arch(settings.model, settings.allow_pickle))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = 0
    for t in complete:
        path = rd.recipe_path(t.number)
        if not _recipe_ok(path):
            from llmpareto.spaces.base import recipe_of

            recipe_of(space, t.params, t.user_attrs).save(path)
            written += 1
    distributed = any(NODE_COLUMNS[0] in t.user_attrs for t in complete)
    if distributed:
        front = write_distributed_outputs(study, rd, settings.objectives, space)
    else:
        front = write_outputs(study, rd, settings.objectives)
    return front, written
