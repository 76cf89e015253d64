"""Joint spaces: formats, sparsity and students in one search (`--space formats,sparsity`,
`formats,students`, `formats,sparsity,students`, `sparsity,students`). A candidate is cut to its
student shape, pruned, then quantized; each part keeps its own parameters and baselines.
"""

from __future__ import annotations

from typing import Any

from llmpareto.errors import UserError
from llmpareto.recipe import Recipe, parse_pattern
from llmpareto.spaces.base import CategoricalSpace


class JointSpace(CategoricalSpace):
    """Several spaces at once; parts are FormatSpace, SparsitySpace and StudentSpace."""

    def __init__(self, *parts) -> None:
        by = {p.name: p for p in parts}
        self.formats, self.sparsity, self.students = (by.get(k) for k in
                                                      ("formats", "sparsity", "students"))
        self.name = ",".join(p.name for p in parts)
        self.prunes = self.sparsity is not None
        self.restructures = self.students is not None
        if self.formats is not None and self.sparsity is not None:
            from llmpareto.formats import get_format

            pattern = self.sparsity.pattern
            lossy = [f for f in self.formats.formats if not get_format(f).keeps_zeros]
            if lossy and parse_pattern(pattern) is not None:
                raise UserError(
                    f"--sparsity-pattern {pattern} with --formats {','.join(lossy)}: these "
                    "formats store d*q+min, so pruned zeros come back non-zero and the "
                    f"{pattern} pattern is lost; leave them out of --formats (or omit "
                    "--formats: the default then drops them) or use --sparsity-pattern "
                    "unstructured")
        self.choices: dict[str, list] = {}
        for p in parts:
            self.choices.update(p.choices)
        self.groups = self.formats.groups if self.formats else {}  # prepared dense formats

    def recipe_from_params(self, params: dict[str, Any]) -> Recipe:
        modules: dict[str, dict | None] = {}
        if self.formats is not None:
            modules = self.formats.recipe_from_params(params).modules
        if self.sparsity is not None:
            if self.formats is None:  # pruned tensors need a stored format: f16 (as alone)
                modules = self.sparsity.recipe_from_params(params).modules
            else:
                for fqn, choice in self.sparsity.module_choices(params).items():
                    modules[fqn] = {**(modules.get(fqn) or {}), **choice}
        structure = self.students.structure_from_params(params) if self.students else {}
        return Recipe(modules, structure=structure)

    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """Uniform formats (dense, the teacher's shape); then each other part's baselines in
        the first format."""
        rest = {}
        if self.sparsity is not None:
            rest.update(dict.fromkeys(self.sparsity.choices, 0.0))
        if self.students is not None:
            rest.update({k: c[0] for k, c in self.students.choices.items()})
        out, first, suffix = [], {}, ""
        if self.formats is not None:
            out = [(label, {**p, **rest}) for label, p in self.formats.baselines()]
            label0, first = self.formats.baselines()[0]
            suffix = " + " + label0.removeprefix("uniform ")
        for part in (self.sparsity, self.students):
            if part is not None:
                out += [(label + suffix, {**rest, **first, **p}) for label, p in part.baselines()]
        return out

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, **{p.name: p.describe() for p in
                                       (self.formats, self.sparsity, self.students) if p}}
