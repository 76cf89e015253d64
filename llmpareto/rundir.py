"""The run directory: runs/<study>/{study.db, run.json, trials.csv, front.*, recipes/}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpareto import atomic
from llmpareto.errors import UserError


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def for_study(cls, runs_dir: str | Path, study: str) -> RunDir:
        """runs_dir/study, for a study name that cannot leave runs_dir."""
        from llmpareto.settings import check_study

        check_study(study)
        return cls(Path(runs_dir) / study)

    db = property(lambda self: self.path / "study.db")
    run_json = property(lambda self: self.path / "run.json")
    trials_csv = property(lambda self: self.path / "trials.csv")
    front_csv = property(lambda self: self.path / "front.csv")
    front_json = property(lambda self: self.path / "front.json")
    front_png = property(lambda self: self.path / "front.png")
    recipes = property(lambda self: self.path / "recipes")

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.db.resolve()}"

    def exists(self) -> bool:
        return self.db.exists() or self.run_json.exists()

    def is_stub(self) -> bool:
        """Only the run.json a new run writes first (status "starting"), no study: a run
        refused or killed before it stored anything."""
        if self.db.exists() or not self.run_json.is_file():
            return False
        try:
            return json.loads(self.run_json.read_text()).get("status") == "starting"
        except (OSError, ValueError, AttributeError):
            return False

    def create(self) -> None:
        """Make the folders; remove temporaries a killed run left (never a live writer's)."""
        self.recipes.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale(self.path)

    def recipe_path(self, trial: int) -> Path:
        return self.recipes / f"{trial}.json"

    def read_run_json(self) -> dict[str, Any]:
        if not self.run_json.is_file():
            raise UserError(f"{self.path} is not a llmpareto run directory (no run.json)")
        try:
            return json.loads(self.run_json.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.run_json} is not valid JSON ({exc}); restore it from a "
                            "backup or start a new --study") from None

    def write_json(self, path: Path, data: Any) -> None:
        """Write via a temporary file so a crash never leaves half a file behind."""
        atomic.write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
