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


class CategoricalSpace:
    """What every space here shares: one categorical Optuna parameter per key of `choices`,
    turned into a Recipe by the space's `recipe_from_params`."""

    prunes = False  # True: recipes may prune, so the run gathers calibration statistics

    def suggest(self, trial: Any) -> Recipe:
        params = {k: trial.suggest_categorical(k, c) for k, c in self.choices.items()}
        return recipe_of(self, params, trial.user_attrs)


def recipe_of(space: Space, params: dict[str, Any], user_attrs: dict[str, Any]) -> Recipe:
    """A trial's recipe: its params through the space, or the whole recipe a baseline carries
    (search.records.RECIPE_ATTR) when the params cannot express it."""
    fixed = user_attrs.get("recipe")
    return Recipe.from_dict(fixed) if fixed else space.recipe_from_params(params)


SPACES: dict[str, Callable[..., Space]] = {}


# the options each space takes from build_space's keyword arguments
SPACE_OPTIONS: dict[str, tuple[str, ...]] = {}
JOINT = {key: "llmpareto.spaces.joint:JointSpace" for key in (
    ("formats", "sparsity"), ("formats", "students"), ("formats", "sparsity", "students"),
    ("sparsity", "students"))}


def register_space(name: str, options: tuple[str, ...] = ()):
    def deco(factory: Callable[..., Space]) -> Callable[..., Space]:
        SPACES[name] = factory
        SPACE_OPTIONS[name] = options
        return factory

    return deco


def build_space(names: str | list[str], arch: Arch, **options: Any) -> Space:
    """One space, or a joint one (`formats,sparsity`); each gets the options it takes."""
    import importlib

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPACES]
    if unknown or not names:
        raise UserError(
            f"--space {','.join(names)}: unknown space {unknown or names}; available: {', '.join(SPACES)}"
        )
    parts = [SPACES[n](arch, **{k: v for k, v in options.items() if k in SPACE_OPTIONS[n]})
             for n in dict.fromkeys(names)]
    if len(parts) == 1:
        return parts[0]
    key = tuple(sorted(dict.fromkeys(names)))
    if key not in JOINT:
        raise UserError(f"--space {','.join(names)}: joint spaces available: "
                        f"{', '.join(','.join(k) for k in JOINT)}")
    module, cls = JOINT[key].split(":")
    by_name = dict(zip(dict.fromkeys(names), parts))
    return getattr(importlib.import_module(module), cls)(*(by_name[n] for n in key))
