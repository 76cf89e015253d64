"""Front: the feasible non-dominated trials of a run, as a DataFrame with their recipes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llmpareto import atomic
from llmpareto.errors import UserError
from llmpareto.pareto import non_dominated
from llmpareto.recipe import Recipe
from llmpareto.rundir import RunDir

# A printed front leaves out points no one would deploy: perplexity above QUALITY_FLOOR times the
# base model's (the uniform f16/bf16/f32 baseline of the run, else the run's lowest perplexity).
# `--show-all` prints them; trials.csv, front.csv and front.json always keep every point.
QUALITY_FLOOR = 2.0
BASE_LABELS = ("uniform f16", "uniform bf16", "uniform f32")

TABLE_COLUMNS = ["trial", "baseline", "perplexity", "kl_nats", "eval_text_perplexity",
                 "eval_text_kl_nats", "recover_method", "recovered_perplexity",
                 "recovered_kl_nats", "recovered_eval_text_perplexity",
                 "recovered_eval_text_kl_nats", "memory_bytes", "weights_bytes", "latency_ms",
                 "energy_mj"]


RECOVERED = "recovered_"  # prefix of the columns recovery measured (search/recover.py)


def effective(trials: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """The objectives' values a front is built from: `recovered_<objective>` where recovery
    measured one, else the trial's own."""
    out = trials[objectives].apply(pd.to_numeric, errors="coerce").astype(float)
    for o in objectives:
        if RECOVERED + o in trials.columns:
            rec = pd.to_numeric(trials[RECOVERED + o], errors="coerce")
            out[o] = rec.where(np.isfinite(rec), out[o])
    return out


def recovered_any(trials: pd.DataFrame, objectives: list[str]) -> bool:
    return any(RECOVERED + o in trials.columns and pd.to_numeric(
        trials[RECOVERED + o], errors="coerce").notna().any() for o in objectives)


def front_mask(trials: pd.DataFrame, objectives: list[str], recovered: bool = True) -> np.ndarray:
    """Rows of `trials` that are complete, feasible and non-dominated on `objectives` (after
    recovery, where recovery measured them, unless `recovered` is False)."""
    ok = (trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)
    vals = (effective(trials, objectives) if recovered else
            trials[objectives].apply(pd.to_numeric, errors="coerce"))
    vals = np.array(vals.loc[ok].to_numpy(float), dtype=float)
    vals[~np.isfinite(vals)] = np.nan
    mask = np.zeros(len(trials), dtype=bool)
    mask[np.flatnonzero(ok.to_numpy())] = non_dominated(vals)
    return mask


@dataclass
class Front:
    df: pd.DataFrame  # one row per front point; units in column names
    objectives: list[str]
    trials: pd.DataFrame | None = None  # every trial of the run, when known
    run_dir: Path | None = None

    @classmethod
    def from_trials(cls, trials: pd.DataFrame, objectives: list[str],
                    run_dir: Path | None = None) -> Front:
        df = trials[front_mask(trials, objectives)]
        # a sampler may propose one recipe several times: show each point once
        same = [c for c in df.columns if c.startswith("param:")] + list(objectives)
        df = df.drop_duplicates(subset=same, keep="first")
        df = df.iloc[np.argsort(effective(df, objectives)[objectives[-1]].to_numpy(),
                                kind="stable")]
        return cls(df.reset_index(drop=True), list(objectives), trials, run_dir)

    @classmethod
    def load(cls, run_dir: str | Path) -> Front:
        rd = RunDir(Path(run_dir))
        info = rd.read_run_json()
        if not rd.trials_csv.is_file():
            raise UserError(f"{rd.path} has no trials.csv yet; finish or --resume the search")
        trials = pd.read_csv(rd.trials_csv, keep_default_na=False, na_values=[""])
        return cls.from_trials(trials, info["settings"]["objectives"], rd.path)

    def __len__(self) -> int:
        return len(self.df)

    def recipe(self, trial: int) -> Recipe:
        if self.run_dir is None:
            raise UserError("this front has no run directory to read recipes from")
        return Recipe.load(RunDir(self.run_dir).recipe_path(int(trial)))

    def pick(self, trial: int | None = None, best: str | None = None) -> pd.Series:
        """A front point by trial number, or the one best in metric `best`."""
        if trial is not None:
            rows = self.df[self.df["trial"] == int(trial)]
            if rows.empty:
                raise UserError(f"trial {trial} is not on the front; front trials: "
                                f"{', '.join(map(str, self.df['trial']))}")
            return rows.iloc[0]
        if best is not None:
            if best not in self.df.columns:
                raise UserError(f"unknown column {best!r}; columns: {', '.join(self.df.columns)}")
            return self.df.loc[self.df[best].idxmin()]
        raise UserError("pick needs a trial number or a metric to be best in")

    def reference_perplexity(self) -> float | None:
        """The base model's perplexity as this run measured it: the uniform f16 (bf16, f32)
        baseline's, else the lowest of any complete trial; None when no trial has one."""
        trials = self.trials if self.trials is not None else self.df
        if "perplexity" not in trials.columns:
            return None
        done = trials[trials["state"] == "COMPLETE"] if "state" in trials.columns else trials
        ppl = pd.to_numeric(done["perplexity"], errors="coerce")
        if "baseline" in done.columns:
            labels = done["baseline"].fillna("").astype(str)
            for label in BASE_LABELS:
                got = ppl[(labels == label) & np.isfinite(ppl)]
                if len(got):
                    return float(got.iloc[0])
        ppl = ppl[np.isfinite(ppl)]
        return float(ppl.min()) if len(ppl) else None

    def deployable(self, floor: float = QUALITY_FLOOR) -> tuple[Front, int, float | None]:
        """The points whose perplexity is at most `floor` times the base model's, how many
        were left out, and the perplexity limit used (None: no perplexity to judge by)."""
        ref = self.reference_perplexity()
        if ref is None:
            return self, 0, None
        limit = floor * ref
        ppl = effective(self.df, ["perplexity"])["perplexity"]  # after recovery, if it ran
        keep = ~(ppl > limit)  # a point with no perplexity is not judged
        shown = Front(self.df[keep].reset_index(drop=True), self.objectives, self.trials,
                      self.run_dir)
        return shown, int((~keep).sum()), limit

    def to_csv(self, path: str | Path) -> None:
        with atomic.atomic_path(path) as tmp:
            self.df.to_csv(tmp, index=False)

    def to_records(self) -> list[dict]:
        recs = self.df.replace({np.nan: None}).to_dict(orient="records")
        if self.run_dir is not None:
            for r in recs:
                r["recipe"] = self.recipe(r["trial"]).to_dict()
        return recs

    def table(self, extra: list[str] | tuple[str, ...] = ()) -> str:
        cols = [c for c in [*TABLE_COLUMNS, *extra]
                if c in self.df.columns and self.df[c].notna().any()]
        view = self.df[cols].copy()
        if "baseline" in view:
            view["baseline"] = view["baseline"].fillna("")
        for c in ("memory_bytes", "weights_bytes"):
            if c in view:
                view[c.replace("_bytes", "_MB")] = view.pop(c) / 1e6
        return view.to_string(index=False, float_format=lambda v: f"{v:.4g}")

    def plot(self, path: str | Path, title: str = "", show_all: bool = False) -> None:
        """Every trial, the front, the uniform baselines (squares) and llama.cpp's presets
        (diamonds); without `show_all`, trials under the quality floor are left out."""
        from llmpareto.report import front_plot_info, plot_front

        trials = self.trials if self.trials is not None else self.df
        x = next((o for o in self.objectives if o.endswith("_bytes")), self.objectives[-1])
        y = next(o for o in self.objectives if o != x)
        limit = None if show_all or y != "perplexity" else self.deployable()[2]
        above = 0 if limit is None else int((pd.to_numeric(
            trials.loc[trials["state"] == "COMPLETE", y], errors="coerce") > limit).sum())
        note = (f"{above} trial(s) above {limit:.4g} ({QUALITY_FLOOR:g}x the base perplexity) "
                "not shown" if above else "")
        info = front_plot_info(trials, self.df, x, y, limit)
        if recovered_any(trials, self.objectives):  # before recovery in blue, after in green
            before = trials[front_mask(trials, self.objectives, recovered=False)]
            after = self.df.assign(**{y: effective(self.df, [y])[y]})
            info = info._replace(
                front_xy=np.array(before.sort_values(x)[[x, y]], dtype=float),
                recovered_xy=np.array(after.sort_values(x)[[x, y]], dtype=float))
        plot_front(info, str(path), title, note)
