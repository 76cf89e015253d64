"""How candidates are proposed: the Optuna driver (local, SQLite or shared RDB), Ray Tune.

Backends are chosen by name through a lazy-import map (`BACKENDS`), so optional engines
(Ray, PostgreSQL drivers) are imported only when that backend is chosen.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

from llmpareto.errors import UserError

BACKENDS = {
    "local": "llmpareto.search.local:run_local",  # SQLite, or a shared RDB with --storage
    "ray": "llmpareto.search.ray_backend:run_ray",  # Ray Tune + OptunaSearch on a cluster
}


def get_backend(name: str) -> Callable:
    if name not in BACKENDS:
        raise UserError(f"--backend {name!r}; available: {', '.join(BACKENDS)}")
    module, func = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def run_search(backend: str = "local", **kwargs: Any):
    """Run (or --resume) a search with `kwargs` as SearchSettings; its Front. A run refused
    before its study existed leaves nothing behind; a failure of the study's database is one
    line saying how to resume."""
    import shutil

    from llmpareto.rundir import RunDir
    from llmpareto.search.settings import SearchSettings

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


class _CallableModule(types.ModuleType):
    """Lets `llmpareto.search(...)` run a search while `llmpareto.search` stays a package."""

    def __call__(self, backend: str = "local", **kwargs: Any):
        return run_search(backend, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["BACKENDS", "get_backend", "run_search"]
