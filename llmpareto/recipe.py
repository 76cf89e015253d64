"""Recipe: the per-module compression choices of one candidate, as plain serializable data.

Keys are module names, `re:<regex>` patterns or `_default`; exact names win over patterns,
patterns are tried in order, `_default` comes last. A value of None leaves a module as is.

Versions (llmpareto/recipe.schema.json is the JSON Schema): 1, `structure.mlp_ratio` and
`structure.heads` are single numbers; 2, either may also be a list with one value per kept
block (a per-block student). A recipe is written with the lowest version that holds it, so a
homogeneous recipe stays readable by an llmpareto that knows only version 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmpareto.errors import UserError

RECIPE_VERSION = 2  # the newest version this llmpareto reads
SCHEMA = "recipe.schema.json"  # shipped beside this module
MODULE_KEYS = {"format", "sparsity", "pattern"}
STRUCTURE_KEYS = {"layers", "mlp_ratio", "heads"}
# compress.prune.PRUNERS implements these (a test keeps the two lists equal); named here so
# settings can be checked before anything heavy is imported
PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt")
NEEDS_CALIBRATION = ("wanda", "sparsegpt")
_NM = re.compile(r"([1-9][0-9]*):([1-9][0-9]*)")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (n, m) for "n:m" (n weights kept in every m consecutive)."""
    if pattern == "unstructured":
        return None
    m = _NM.fullmatch(str(pattern))
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"sparsity pattern {pattern!r}: use 'unstructured' or 'N:M' with "
                        "N < M, e.g. 2:4 (2 kept in every 4) or 4:8")
    return int(m.group(1)), int(m.group(2))


def _check_choice(key: str, choice: Any) -> dict | None:
    if choice is None:
        return None
    if not isinstance(choice, dict):
        raise UserError(f"recipe entry {key!r} must be an object like {{\"format\": \"q4_0\"}}")
    unknown = set(choice) - MODULE_KEYS
    if unknown:
        raise UserError(
            f"recipe entry {key!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(MODULE_KEYS)}"
        )
    if "format" in choice:
        from llmpareto.formats import get_format

        get_format(choice["format"])
    if "sparsity" in choice:
        sp = choice["sparsity"]
        if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not 0.0 <= sp < 1.0:
            raise UserError(f"recipe entry {key!r}: sparsity must be a number in [0, 1), got "
                            f"{sp!r}")
    if "pattern" in choice:
        parse_pattern(choice["pattern"])
    return dict(choice)


@dataclass
class Recipe:
    modules: dict[str, dict | None] = field(default_factory=dict)
    structure: dict[str, Any] = field(default_factory=dict)
    version: int = field(default=RECIPE_VERSION, compare=False)  # as read; written: needed_version

    def __post_init__(self) -> None:
        self.modules = {k: _check_choice(k, v) for k, v in self.modules.items()}
        for key in self.modules:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise UserError(f"recipe key {key!r} is not a valid regex: {exc}") from None
        unknown = set(self.structure) - STRUCTURE_KEYS
        if unknown:
            raise UserError(
                f"recipe structure has unknown key(s) {sorted(unknown)}; allowed: {sorted(STRUCTURE_KEYS)}"
            )
        self.structure = {k: list(v) if isinstance(v, tuple) else v
                          for k, v in self.structure.items()}

    def resolve(self, fqn: str) -> dict | None:
        """The choice for module `fqn`: exact key, else first matching regex, else _default."""
        if fqn in self.modules:
            return self.modules[fqn]
        for key, choice in self.modules.items():
            if key.startswith("re:") and re.fullmatch(key[3:], fqn):
                return choice
        return self.modules.get("_default")

    def format_of(self, fqn: str, default: str | None = None) -> str | None:
        choice = self.resolve(fqn)
        return (choice or {}).get("format", default)

    def sparsity_of(self, fqn: str) -> tuple[str, float] | None:
        """(pattern, level) when module `fqn` is pruned, else None. N:M implies its level."""
        choice = self.resolve(fqn) or {}
        pattern = choice.get("pattern", "unstructured")
        nm = parse_pattern(pattern)
        level = 1.0 - nm[0] / nm[1] if nm else float(choice.get("sparsity", 0.0))
        return (pattern, level) if level > 0 else None

    @property
    def needed_version(self) -> int:
        """The lowest recipe version that holds this recipe (2: per-block structure lists)."""
        from llmpareto.structure import is_per_block

        return 2 if is_per_block(self.structure) else 1

    def to_dict(self) -> dict:
        return {"version": self.needed_version, "modules": self.modules,
                "structure": self.structure}

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict):
            raise UserError("a recipe must be a JSON object with 'version', 'modules', 'structure'")
        unknown = set(data) - {"version", "modules", "structure"}
        if unknown:
            raise UserError(
                f"recipe has unknown key(s) {sorted(unknown)}; allowed: version, modules, structure"
            )
        version = data.get("version", RECIPE_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise UserError(f"recipe 'version' must be a whole number >= 1, got {version!r}")
        for part in ("modules", "structure"):
            if not isinstance(data.get(part, {}), dict):
                raise UserError(f"recipe {part!r} must be a JSON object (name -> choice), got "
                                f"{type(data[part]).__name__}")
        if version > RECIPE_VERSION:
            raise UserError(
                f"recipe version {version} is newer than this llmpareto understands "
                f"({RECIPE_VERSION}); upgrade llmpareto"
            )
        recipe = cls(dict(data.get("modules", {})), dict(data.get("structure", {})), version)
        if recipe.needed_version > version:
            raise UserError(f"recipe version {version} holds one 'mlp_ratio' and one 'heads' for "
                            f"every block; a list per kept block needs \"version\": "
                            f"{recipe.needed_version}")
        return recipe

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"recipe is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        from llmpareto import atomic

        atomic.write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"recipe file {p} does not exist")
        return cls.from_json(p.read_text())

    @staticmethod
    def schema() -> dict:
        """The JSON Schema of a recipe file (every version this llmpareto reads)."""
        return json.loads((Path(__file__).parent / SCHEMA).read_text())

    @classmethod
    def uniform(cls, fmt: str) -> Recipe:
        return cls({"_default": {"format": fmt}})
