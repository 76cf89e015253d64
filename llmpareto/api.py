"""Public Python API; each keyword argument is a `llmpareto search` flag (dashes -> underscores)."""

from __future__ import annotations

from typing import Any

from llmpareto.front import Front
from llmpareto.settings import SearchSettings


def search(backend: str = "local", **kwargs: Any) -> Front:
    """Run (or --resume) a search and return its Pareto front.

    Example: `llmpareto.search(max_memory="120MB", trials=40, study="demo")`.
    See `SearchSettings` for every option and its default.
    """
    from llmpareto.search import get_backend

    settings = SearchSettings.from_dict(kwargs)
    return get_backend(backend)(settings)
