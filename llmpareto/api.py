"""Public Python API; each keyword argument is a `llmpareto search` flag (dashes -> underscores)."""

from __future__ import annotations

from typing import Any

from llmpareto.errors import UserError
from llmpareto.front import Front
from llmpareto.settings import SearchSettings


def search(backend: str = "local", **kwargs: Any) -> Front:
    """Run (or --resume) a search and return its Pareto front.

    Example: `llmpareto.search(max_memory="120MB", trials=40, study="demo")`.
    See `SearchSettings` for every option and its default.
    """
    import shutil

    from llmpareto.rundir import RunDir
    from llmpareto.search import get_backend

    settings = SearchSettings.from_dict(kwargs)
    rd = RunDir.for_study(settings.runs_dir, settings.study)
    fresh = not rd.path.exists()
    try:
        return get_backend(backend)(settings)
    except UserError:
        if fresh and rd.is_stub():  # refused before its study existed: leave nothing behind
            shutil.rmtree(rd.path, ignore_errors=True)
        raise
    except Exception as exc:
        if not _storage_failure(exc):
            raise
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        chain, e = [], exc
        while e is not None and len(chain) < 8:  # optuna wraps the driver's error
            chain.append(str(e))
            e = e.__cause__ or e.__context__
        full = any("disk is full" in m or "No space left" in m for m in chain)
        raise UserError(
            f"the study database could not be written ({type(exc).__name__}: {first})"
            + ("; the disk is full: free disk space" if full else
               "; check the disk and the database server")
            + f", then run again with --study {settings.study} --resume: completed trials "
              f"are kept") from None


def _storage_failure(exc: Exception) -> bool:
    """An error of the study's database itself (full disk, lost server), not of llmpareto."""
    import optuna
    from sqlalchemy.exc import OperationalError

    return isinstance(exc, (optuna.exceptions.StorageInternalError, OperationalError))
