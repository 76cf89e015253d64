"""llmpareto: hardware-aware search for compressed LLMs on a Pareto front.

Public API, one function per command with the flags as keywords (llmpareto/api.py):
`search`, `load_front` (`llmpareto front`), `pick`, `distill`, `cost`, `worker`; and `Recipe`.
"""

from __future__ import annotations

from pathlib import Path as _Path

# The subpackages (search/, spaces/, ...) live beside this folder and are mapped with
# setuptools package-dir. When Python finds this folder straight from a source checkout
# (cwd on sys.path, `python -m ...`), the mapping is bypassed; adding the checkout root to
# __path__ lets `llmpareto.search` resolve to ../search there too.
_root = _Path(__file__).resolve().parent.parent
if ((_root / "pyproject.toml").is_file() and (_root / "search" / "__init__.py").is_file()
        and str(_root) not in __path__):
    __path__.append(str(_root))

__version__ = "0.1.0"

# `llmpareto.search` is both the subpackage (search/) and the verb: the module is callable,
# `llmpareto.search(max_memory="120MB")` runs llmpareto.api.search.
from llmpareto import search
from llmpareto.errors import UserError
from llmpareto.recipe import Recipe

_API = ("load_front", "pick", "distill", "cost", "worker")


def __getattr__(name):  # the verbs load pandas and friends only when first used
    if name in _API:
        from llmpareto import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmpareto' has no attribute {name!r}")


__all__ = ["Recipe", "UserError", "__version__", "cost", "distill", "load_front", "pick", "search",
           "worker"]
