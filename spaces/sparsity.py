"""Sparsity space (AMC-style): a pruning level per block projection, module or projection kind
(`--granularity`), unstructured levels or, for an N:M pattern, dense or N:M per group (the joint
space `formats,sparsity`, prune then quantize, is in spaces/joint.py).

Embeddings and the output head are never pruned. How the pruned weights are made (magnitude,
Wanda, SparseGPT) is a run setting, not a per-module choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmpareto.arch import Arch, Tensor2D
from llmpareto.errors import UserError
from llmpareto.recipe import Recipe, parse_pattern
from llmpareto.spaces.base import CategoricalSpace, register_space
from llmpareto.spaces.formats import GRANULARITIES, _group_key

DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
PREFIX = "sparsity:"  # parameter names, apart from the format space's in a joint space


@dataclass
class SparsitySpace(CategoricalSpace):
    arch: Arch
    levels: list[float] | None = None
    pattern: str = "unstructured"
    granularity: str = "type"
    method: str = "wanda"
    name: str = "sparsity"
    prunes = True  # class attribute, not a field

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise UserError(f"--granularity {self.granularity!r}; choose one of "
                            f"{', '.join(GRANULARITIES)}")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            odd = sorted({t.cols for t in self.arch.linears if t.cols % nm[1]})
            if odd:
                raise UserError(f"--sparsity-pattern {self.pattern}: {nm[1]} does not divide "
                                f"rows of {odd} columns in this model; choose another N:M")
        self.levels = sorted(set(self.levels if self.levels is not None else DEFAULT_LEVELS))
        self.groups: dict[str, list[Tensor2D]] = {}
        for t in self.arch.linears:
            self.groups.setdefault(PREFIX + _group_key(t, self.granularity), []).append(t)
        options = self.levels if nm is None else [0.0, 1.0 - nm[0] / nm[1]]
        self.choices: dict[str, list[float]] = {k: list(options) for k in self.groups}
        self.outliers: dict[str, float] = {}  # group -> OWL outlier ratio (set_outliers)

    def set_outliers(self, ratios: dict[str, float]) -> None:
        """Each group's OWL outlier ratio (compress.prune.outlier_ratio on the base model's
        statistics); adds OWL-style baselines for unstructured levels."""
        self.outliers = dict(ratios)

    def owl_params(self, target: float) -> dict[str, float]:
        """OWL's allocation at mean sparsity `target`, on this space's level grid: each group
        rounded down, then raised one grid step at a time (largest remainder first) while the
        size-weighted mean stays nearest `target`."""
        from llmpareto.compress.prune import owl_levels

        keys = list(self.groups)
        sizes = [sum(t.numel for t in self.groups[k]) for k in keys]
        want = owl_levels([self.outliers[k] for k in keys], sizes, target)
        grid = self.levels
        idx = [max([i for i, g in enumerate(grid) if g <= w + 1e-12] or [0]) for w in want]
        total = sum(sizes)

        def mean(ix):
            return sum(grid[i] * n for i, n in zip(ix, sizes)) / total

        order = sorted(range(len(keys)), key=lambda j: grid[idx[j]] - want[j])
        for j in order:
            if idx[j] + 1 < len(grid):
                up = idx[:j] + [idx[j] + 1] + idx[j + 1:]
                if abs(mean(up) - target) < abs(mean(idx) - target):
                    idx = up
        return {k: grid[i] for k, i in zip(keys, idx)}

    def module_choices(self, params: dict[str, Any]) -> dict[str, dict]:
        """fqn -> {"sparsity"/"pattern"} of every pruned projection (level > 0)."""
        out = {}
        for key, tensors in self.groups.items():
            level = float(params[key])
            if level <= 0:
                continue
            choice = ({"pattern": "unstructured", "sparsity": level}
                      if parse_pattern(self.pattern) is None else {"pattern": self.pattern})
            out.update({t.fqn: dict(choice) for t in tensors})
        return out

    def recipe_from_params(self, params: dict[str, Any]) -> Recipe:
        """Every tensor in f16, pruned or not: a pruned tensor needs a stored format, and a
        dense one in the same format makes the two cost alike (no device profile's runtime
        gains from the zeros yet)."""
        modules: dict[str, dict | None] = {"_default": {"format": "f16"}}
        modules.update({fqn: {"format": "f16", **c}
                        for fqn, c in self.module_choices(params).items()})
        return Recipe(modules)

    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """Every group at one level: uniform sparsity at each level (> 0) of the space; then,
        once outlier ratios are set (unstructured only), OWL's allocation at each of those
        mean levels where it differs from uniform."""
        levels = [v for v in self.choices[next(iter(self.choices))] if v > 0]
        out = [(f"uniform {self._label(v)} {self.method}", dict.fromkeys(self.choices, v))
               for v in levels]
        if self.outliers and parse_pattern(self.pattern) is None:
            for v in levels:
                owl = self.owl_params(v)
                if len(set(owl.values())) > 1:
                    out.append((f"OWL {self._label(v)} {self.method}", owl))
        return out

    def _label(self, level: float) -> str:
        return self.pattern if parse_pattern(self.pattern) else f"{round(100 * level)}%"

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "levels": self.levels, "pattern": self.pattern,
                "method": self.method, "granularity": self.granularity,
                "choices": self.choices}


register_space("sparsity", ("levels", "pattern", "granularity", "method"))(SparsitySpace)
