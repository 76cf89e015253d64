"""Bit-width space (HAQ-style): a weight format per linear module, block or projection kind.

Embeddings (and an untied output head) are their own choice. A format is offered for a group
when at least one of its tensors can hold it natively; tensors whose rows do not fit take the
format's llama.cpp-style fallback (tq2_0 -> q4_0), and the memory evaluator sees that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmpareto.arch import Arch, Tensor2D
from llmpareto.errors import UserError
from llmpareto.formats import FORMATS, GGUF_FORMATS, effective_format, get_format
from llmpareto.recipe import Recipe
from llmpareto.spaces.base import CategoricalSpace, register_space

GRANULARITIES = ("module", "block", "type")
# exportable to GGUF, so every front point can run in llama.cpp; the 2-bit i-quants only when
# named (they need an importance matrix and are far from lossless on small models)
DEFAULT_FORMATS = tuple(f for f in GGUF_FORMATS if not f.startswith("iq2"))


def parse_formats(formats: str | list[str] | None) -> list[str]:
    if formats is None:
        return list(DEFAULT_FORMATS)
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    for f in formats:
        get_format(f)
    if not formats:
        raise UserError(f"--formats needs at least one format; known: {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def _group_key(t: Tensor2D, granularity: str) -> str:
    if t.layer is None:
        return t.kind  # "embed" / "lm_head" are always their own choice
    if granularity == "module":
        return t.fqn
    if granularity == "block":
        return f"layers.{t.layer}"
    return t.kind


@dataclass
class FormatSpace(CategoricalSpace):
    arch: Arch
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    granularity: str = "type"
    name: str = "formats"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise UserError(
                f"--granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        self.formats = parse_formats(self.formats)
        self.groups: dict[str, list[Tensor2D]] = {}
        for t in self.arch.tensors:
            self.groups.setdefault(_group_key(t, self.granularity), []).append(t)
        self.choices: dict[str, list[str]] = {}
        for key, tensors in self.groups.items():
            ok = [f for f in self.formats if any(get_format(f).fits(t.cols) for t in tensors)]
            if not ok:  # nothing fits natively: offer what the fallbacks turn them into
                ok = list(dict.fromkeys(effective_format(f, tensors[0].cols) for f in self.formats))
            self.choices[key] = ok

    def recipe_from_params(self, params: dict[str, Any]) -> Recipe:
        modules = {}
        for key, tensors in self.groups.items():
            for t in tensors:
                modules[t.fqn] = {"format": params[key]}
        return Recipe(modules)

    def _closest_choice(self, fmt: str, key: str) -> str:
        seen = set()
        while fmt not in self.choices[key] and fmt not in seen:
            seen.add(fmt)
            fmt = get_format(fmt).fallback or "f16"
        return fmt if fmt in self.choices[key] else self.choices[key][0]

    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """One uniform recipe per format (fallbacks where a group cannot hold it)."""
        return [
            (f"uniform {fmt}", {k: self._closest_choice(fmt, k) for k in self.choices})
            for fmt in self.formats
        ]

    def closest_params(self, formats: dict[str, str]) -> dict[str, str]:
        """The space's nearest point to a per-tensor assignment (e.g. a llama.cpp preset, which
        can mix types within a group): each group's most common format among its choices, by
        weight count, or failing that the first choice."""
        out = {}
        for key, tensors in self.groups.items():
            weight: dict[str, int] = {}
            for t in tensors:
                f = formats.get(t.fqn)
                if f in self.choices[key]:
                    weight[f] = weight.get(f, 0) + t.rows * t.cols
            out[key] = max(weight, key=weight.get) if weight else self.choices[key][0]
        return out

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "formats": self.formats, "granularity": self.granularity,
                "choices": self.choices}


register_space("formats", ("formats", "granularity"))(FormatSpace)
