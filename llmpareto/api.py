"""Public Python API; each keyword argument is a `llmpareto search` flag (dashes -> underscores)."""

from __future__ import annotations

from typing import Any

from llmpareto.front import Front


def search(backend: str = "local", **kwargs: Any) -> Front:
    """Run (or --resume) a search and return its Pareto front.

    Example: `llmpareto.search(max_memory="120MB", trials=40, study="demo")`.
    See `SearchSettings` for every option and its default.
    """
    from llmpareto.search import run_search

    return run_search(backend, **kwargs)
