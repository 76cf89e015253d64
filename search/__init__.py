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


class _CallableModule(types.ModuleType):
    """Lets `llmpareto.search(...)` run a search while `llmpareto.search` stays a package."""

    def __call__(self, backend: str = "local", **kwargs: Any):
        from llmpareto.api import search

        return search(backend=backend, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["BACKENDS", "get_backend"]
