"""Student space (NAS-style): how many blocks a student keeps, its MLP width and its attention
groups; and the joint spaces that add formats and sparsity to it.

`granularity` "model" searches one MLP width and one KV-group count for every block (what one
Hugging Face config holds; Minitron's choice); "block" one of each per block (AMC's per-layer
ratios as structure a runtime runs smaller; Puzzle's heterogeneous blocks): keys
`student:mlp_ratio.<i>` and `student:heads.<i>` for block i of the teacher, read for the
blocks a student keeps. llama.cpp runs such a student as its `deci` architecture.

Which blocks are kept is not searched: a student of n blocks keeps the n of highest Block
Influence on calibration text (set_block_influence, once per run); its narrower MLP and its
attention groups are chosen by importance too (compress.restructure). Recipes carry the kept
block list itself, so `pick` rebuilds the same student without recomputing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmpareto.arch import Arch
from llmpareto.errors import UserError
from llmpareto.recipe import Recipe
from llmpareto.spaces.base import CategoricalSpace, register_space
from llmpareto.structure import aligned_ratios

PREFIX = "student:"
DEFAULT_BLOCK_FRACTIONS = (1.0, 0.9, 0.8, 0.7)
DEFAULT_MLP_RATIOS = (1.0, 0.875, 0.75, 0.5)


def _grid(values, name: str, lo: float, hi: float, kind=float) -> list:
    out = sorted({kind(v) for v in values}, reverse=True)
    bad = [v for v in out if not lo <= v <= hi]
    if bad or not out:
        raise UserError(f"--student-{name} {values!r}: every value must be in [{lo}, {hi}] for "
                        "this model (a student is never larger than its teacher)")
    return out


@dataclass
class StudentSpace(CategoricalSpace):
    arch: Arch
    blocks: list[int] | None = None  # numbers of blocks kept; None: 100/90/80/70% of them
    mlp_ratios: list[float] | None = None  # MLP width kept; None: 1, 0.875, 0.75, 0.5
    heads: list[int] | None = None  # KV groups kept per block; None: every count
    student_granularity: str = "model"  # model | block (see the module doc)
    name: str = "students"
    influence: list[float] = field(default_factory=list)  # Block Influence, set per run
    restructures = True  # class attribute: the run gathers block and channel importance

    def __post_init__(self) -> None:
        n, kv = self.arch.n_layers, self.arch.n_kv_heads
        asked = {"blocks": self.blocks is not None, "mlp_ratios": self.mlp_ratios is not None,
                 "heads": self.heads is not None}
        blocks = self.blocks or [max(1, round(f * n)) for f in DEFAULT_BLOCK_FRACTIONS]
        self.blocks = _grid(blocks, "blocks", 1, n, int)
        self.mlp_ratios = _grid(self.mlp_ratios or DEFAULT_MLP_RATIOS, "mlp-ratios", 1e-9, 1.0)
        self.heads = _grid(self.heads or range(1, kv + 1), "heads", 1, kv, int)
        self._only_family_cuts(n, kv, asked)
        grids = {"blocks": self.blocks, "mlp_ratio": self.mlp_ratios, "heads": self.heads}
        if self.student_granularity == "block":
            self._check_per_block()
            inter = self.arch.intermediate_size
            ratios = sorted(set(aligned_ratios(inter, self.mlp_ratios)), reverse=True) \
                if inter else self.mlp_ratios
            grids = {"blocks": self.blocks,
                     **{f"mlp_ratio.{i}": ratios for i in range(n)},
                     **{f"heads.{i}": self.heads for i in range(n)}}
        self.choices: dict[str, list] = {PREFIX + k: v for k, v in grids.items()}

    def _check_per_block(self) -> None:
        """Per-block sizes need a runtime that builds each block at its own size: llama.cpp
        does for its Llama-layout `deci` architecture, not for the others' loaders."""
        from llmpareto.families import FAMILIES

        fam = FAMILIES.get(self.arch.family or "")
        if fam is not None and fam.gguf_arch != "llama":
            raise UserError(f"--student-granularity block: llama.cpp loads every {fam.name} "
                            "block at the first block's size, so per-block widths would not "
                            "run; use --student-granularity model for this model")

    def _only_family_cuts(self, n: int, kv: int, asked: dict[str, bool]) -> None:
        """A cut the model's family cannot take is no choice: asked for explicitly, one line;
        by default, that dimension stays the teacher's."""
        if self.arch.family is None:
            return
        from llmpareto.families import FAMILIES

        fam = FAMILIES[self.arch.family]
        for cut, grid, full, flag in (("layers", "blocks", n, "blocks"),
                                      ("mlp_ratio", "mlp_ratios", 1.0, "mlp-ratios"),
                                      ("heads", "heads", kv, "heads")):
            if cut in fam.cuts:
                continue
            values = getattr(self, grid)
            if asked[grid] and any(v != full for v in values):
                fam.check_cuts({cut: min(values)}, f"--student-{flag} {min(values)}")
            setattr(self, grid, [full])

    def set_block_influence(self, influence: list[float]) -> None:
        self.influence = list(influence)

    def structure_from_params(self, params: dict[str, Any]) -> dict[str, Any]:
        from llmpareto.compress.restructure import keep_blocks

        n = int(params.get(PREFIX + "blocks", self.arch.n_layers))
        out: dict[str, Any] = {}
        if n < self.arch.n_layers:
            if not self.influence:
                raise UserError("a student with fewer blocks needs Block Influence: set "
                                "--calib-tokens > 0")
            out["layers"] = keep_blocks(self.influence, n)
        kept = out.get("layers", range(self.arch.n_layers))
        for cut, full, kind in (("mlp_ratio", 1.0, float), ("heads", self.arch.n_kv_heads, int)):
            if self.student_granularity == "block":
                values = [kind(params.get(f"{PREFIX}{cut}.{i}", full)) for i in kept]
            else:
                values = [kind(params.get(PREFIX + cut, full))]
            if len(set(values)) > 1:
                out[cut] = values  # per kept block, in the order of `layers`
            elif values[0] != full:
                out[cut] = values[0]  # every block alike: a homogeneous student
        return out

    def recipe_from_params(self, params: dict[str, Any]) -> Recipe:
        return Recipe({}, structure=self.structure_from_params(params))

    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """Students that shrink one dimension at a time (in every block alike), the others as
        the teacher's."""
        full = {k: c[0] for k, c in self.choices.items()}
        cuts: dict[str, list[str]] = {}
        for key in self.choices:
            cuts.setdefault(key.removeprefix(PREFIX).split(".")[0], []).append(key)
        out = []
        for label, keys in cuts.items():
            for v in self.choices[keys[0]][1:]:
                shown = round(v, 4) if isinstance(v, float) else v
                out.append((f"student {label}={shown}", {**full, **dict.fromkeys(keys, v)}))
        return out

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "blocks": self.blocks, "mlp_ratios": self.mlp_ratios,
                "heads": self.heads, "granularity": self.student_granularity,
                "choices": self.choices}


register_space("students", ("blocks", "mlp_ratios", "heads", "student_granularity"))(StudentSpace)
