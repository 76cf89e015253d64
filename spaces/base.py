"""The Space contract and its registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from llmpareto.arch import Arch
from llmpareto.errors import UserError
from llmpareto.recipe import Recipe


class Space(Protocol):
    name: str

    def suggest(self, trial: Any) -> Recipe: ...  # optuna.Trial -> Recipe

    def recipe_from_params(self, params: dict[str, Any]) -> Recipe: ...

    def baselines(self) -> list[tuple[str, dict[str, Any]]]: ...  # (label, params)

    def describe(self) -> dict[str, Any]: ...  # JSON; two runs with equal dicts search alike


SPACES: dict[str, Callable[..., Space]] = {}


def register_space(name: str):
    def deco(factory: Callable[..., Space]) -> Callable[..., Space]:
        SPACES[name] = factory
        return factory

    return deco


def build_space(names: str | list[str], arch: Arch, **options: Any) -> Space:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPACES]
    if unknown or not names:
        raise UserError(
            f"--space {','.join(names)}: unknown space {unknown or names}; available: {', '.join(SPACES)}"
        )
    if len(names) > 1:
        raise UserError(
            f"--space {','.join(names)}: joint spaces arrive with the sparsity and student "
            f"spaces; available now: {', '.join(SPACES)}"
        )
    return SPACES[names[0]](arch, **options)
