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
