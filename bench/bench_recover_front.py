"""Benchmark of recovery inside the search (issue 26) on the default model: `llmpareto search`
with `--recover-steps`, then for each llama.cpp preset (imatrix) the best point of the run with
no more memory, before and after recovery, compared on the evaluation text (another domain:
nothing in the run calibrated or trained on it) as KL to the base model and perplexity.

Run: python -m llmpareto.bench.bench_recover_front [--trials 30] [--recover-steps 16]
     [--recover-rounds 1] [--recover-tokens 1024] [--formats LIST] [--out DIR]
     [--resume STUDY]  (a killed run continues where it stopped, same flags)
     (with --joint: --resume FORMATS_STUDY[,JOINT_STUDY], the studies under --out/runs)
     [--guard-verdicts STUDY]  (a run from before the guard text: its verdicts applied)
     (--quick: to check it runs)

With --joint SPACE (e.g. formats,students,sparsity): two searches with the same number of
searched trials (`--trials`, counted after each search's own baselines: the joint space has
more uniform recipes) and recovery settings (equal compute), formats alone and SPACE, then per
search the hypervolume of
(eval-text perplexity after recovery, memory_bytes) over both searches' points (one reference),
the seconds, and the smallest memory at which a point stays within 10% of the base model's
eval-text perplexity, before and after recovery.

The default model's linears were published as Q4_1: a point made of q4_1 is lossless here and
beats every preset for nothing. `--formats` without q4_1 measures what the search and recovery
add on grids the model was not published on.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd


def best_at_most(t: pd.DataFrame, memory: float, col: str) -> pd.Series | None:
    """The run's point with memory_bytes <= memory that is lowest in `col` (None: none)."""
    rows = t[(t["memory_bytes"] <= memory) & t[col].notna()]
    return None if rows.empty else rows.loc[rows[col].idxmin()]


def compare(t: pd.DataFrame) -> pd.DataFrame:
    """Per preset: its eval-text KL and perplexity; the best point of no more memory before
    recovery and after (recovered values where recovery ran, else the point's own)."""
    t = t[(t["state"] == "COMPLETE") & t["feasible"].astype(bool)].copy()
    for m in ("kl_nats", "perplexity"):
        rec = t.get(f"recovered_eval_text_{m}", pd.Series(np.nan, index=t.index))
        t[f"after_{m}"] = rec.where(rec.notna(), t[f"eval_text_{m}"])
    rows = []
    presets = t[t["baseline"].fillna("").astype(str).str.startswith("llama.cpp ")]
    for _, p in presets.sort_values("memory_bytes").iterrows():
        row = {"preset": p["baseline"].removeprefix("llama.cpp "), "memory_MB": p["memory_bytes"] / 1e6,
               "preset_kl": p["eval_text_kl_nats"], "preset_ppl": p["eval_text_perplexity"]}
        for stage, col in (("before", "eval_text_kl_nats"), ("after", "after_kl_nats")):
            b = best_at_most(t, p["memory_bytes"], col)
            if b is None:
                continue
            row.update({f"{stage}_trial": int(b["trial"]), f"{stage}_kl": b[col],
                        f"{stage}_ppl": b["eval_text_perplexity" if stage == "before"
                                          else "after_perplexity"],
                        f"{stage}_kl_gain_pct": 100 * (1 - b[col] / p["eval_text_kl_nats"])})
        rows.append(row)
    return pd.DataFrame(rows)


def after(t: pd.DataFrame) -> pd.DataFrame:
    """Complete feasible points measured on the eval text, with `after_perplexity` (recovered
    where a point kept recovered weights, else its own)."""
    t = t[(t["state"] == "COMPLETE") & t["feasible"].astype(bool)
          & t["eval_text_perplexity"].notna()].copy()
    rec = t.get("recovered_eval_text_perplexity", pd.Series(np.nan, index=t.index))
    t["after_perplexity"] = rec.where(rec.notna(), t["eval_text_perplexity"])
    return t


def joint_table(runs: dict[str, tuple[pd.DataFrame, float]], base_ppl: float) -> pd.DataFrame:
    """Per search: hypervolume of (eval-text perplexity after recovery, memory) against one
    reference (1.1x the largest memory and 2x the base's eval-text perplexity, both searches'
    points clipped to it), and the smallest memory within 10% of the base's perplexity."""
    from llmpareto.pareto import hypervolume_2d

    ref = (2 * base_ppl, 1.1 * max(t["memory_bytes"].max() for t, _ in runs.values()))
    rows = []
    for name, (t, seconds) in runs.items():
        row = {"search": name, "seconds": round(seconds), "measured_points": len(t)}
        for stage, col in (("before", "eval_text_perplexity"), ("after", "after_perplexity")):
            pts = t[[col, "memory_bytes"]].to_numpy(float)
            pts = pts[(pts[:, 0] < ref[0]) & (pts[:, 1] < ref[1])]
            row[f"hv_{stage}"] = hypervolume_2d(pts / np.array(ref), (1.0, 1.0)) if len(pts) \
                else 0.0
            ok = t[t[col] <= 1.1 * base_ppl]
            row[f"min_MB_within_10pct_{stage}"] = ok["memory_bytes"].min() / 1e6 if len(ok) \
                else None
        rows.append(row)
    df = pd.DataFrame(rows)
    df["hv_after_gain_pct"] = 100 * (df["hv_after"] / df["hv_after"].iloc[0] - 1)
    return df


def n_baselines(kw: dict) -> int:
    """How many baseline trials (uniform recipes, llama.cpp's presets) a search with these
    settings enqueues before its strategy proposes anything."""
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    runner = TrialRunner(SearchSettings(**kw, progress=False))
    return len(runner.space.baselines()) + len(runner.preset_baselines())


def joint(a) -> None:
    """--joint: formats alone against `a.joint` at equal trials and recovery settings."""
    import llmpareto

    out, runs, base = Path(a.out), {}, []
    named = a.resume.split(",") if a.resume else []
    for space in ("formats", a.joint):
        tag = space.replace(",", "-")
        study = next((n for n in named if re.fullmatch(
            rf"recover-joint-{re.escape(tag)}-\d{{8}}-\d{{6}}", n)), None)
        resume = study is not None and (out / "runs" / study).is_dir()
        study = study or f"recover-joint-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
        t0 = time.perf_counter()
        kw = {"space": space, "recover_steps": a.recover_steps, "recover_rounds": a.recover_rounds,
              "recover_tokens": a.recover_tokens, **({"formats": a.formats} if a.formats else {})}
        llmpareto.search(study=study, runs_dir=str(out / "runs"), progress=True,
                         trials=a.trials + n_baselines(kw), **kw,
                         **({"resume": True} if resume else {}))
        if resume:
            print(f"{study}: resumed; its seconds count this invocation only")
        t = after(pd.read_csv(out / "runs" / study / "trials.csv"))
        runs[space] = (t, time.perf_counter() - t0)
        f16 = t[t["baseline"].fillna("").astype(str).str.contains("f16")]
        base += list(f16["eval_text_perplexity"])
    if not base:
        raise SystemExit("no f16 baseline measured on the eval text: keep f16 in --formats")
    df = joint_table(runs, float(np.min(base)))
    df.to_csv(out / "recover_joint.csv", index=False)
    print(f"base eval-text perplexity {np.min(base):.3f}")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def guard_verdicts(run: Path) -> pd.DataFrame:
    """For a run made before recovery had a guard text: each point that kept recovered weights
    re-scored on the guard text (`--recover-guard` as the run has it; the shipped
    python-source by default) before and after recovery, and the keep rule's verdict."""
    from llmpareto.recipe import Recipe
    from llmpareto.search import recover as rec
    from llmpareto.search.workbench import Workbench

    bench = Workbench.from_run(run)
    measure = rec.Measure(bench, None, None, rec.guard_windows(bench))
    t = pd.read_csv(run / "trials.csv")
    rows = []
    for trial in t.loc[t["recover_used"].fillna(False).astype(bool), "trial"].astype(int):
        recipe = Recipe.load(run / "recipes" / f"{trial}.json")
        bench.build(recipe)
        before = measure.guard_kl()
        try:
            rec.use_recovered(bench, recipe, *rec.load_recovered(run, trial))
            after = measure.guard_kl()
        finally:
            bench.cache.set_override({})
        # these points passed the held-out windows already: only the guard can veto them
        rows.append({"trial": trial, "guard_kl_before": before, "guard_kl_after": after,
                     "veto": rec.vetoed(1.0, 0.0, before, after)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    import llmpareto

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--recover-steps", type=int, default=16)
    ap.add_argument("--recover-rounds", type=int, default=1)
    ap.add_argument("--recover-tokens", type=int, default=1024)
    ap.add_argument("--formats", default=None, help="the search's --formats (default: its own)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--joint", default=None, help="a joint --space to compare with formats "
                    "alone after recovery, e.g. formats,students,sparsity")
    ap.add_argument("--resume", default=None, metavar="STUDY",
                    help="continue a killed run (runs/<STUDY> under --out), same flags; with "
                    "--joint, its studies as a comma list (a study not yet made starts anew)")
    ap.add_argument("--guard-verdicts", default=None, metavar="STUDY",
                    help="a finished run (runs/<STUDY> under --out) from before the guard "
                    "text: the presets' comparison with the guard's verdicts applied")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.guard_verdicts:
        run = Path(a.out) / "runs" / a.guard_verdicts
        v = guard_verdicts(run)
        print(v.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        t = pd.read_csv(run / "trials.csv")
        vetoed = t["trial"].isin(v.loc[v["veto"] != "", "trial"])
        t.loc[vetoed, [c for c in t.columns if c.startswith("recovered_")]] = np.nan
        print(compare(t).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        return None
    if a.quick:
        a.trials, a.recover_steps, a.recover_tokens = 12, 2, 512
        a.formats = a.formats or "f16,q8_0,q4_0,q4_K"  # leaves trials for the presets
    if a.joint:
        return joint(a)
    out = Path(a.out)
    study = a.resume or f"recover-front-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    llmpareto.search(study=study, runs_dir=str(out / "runs"), trials=a.trials,
                     recover_steps=a.recover_steps, recover_rounds=a.recover_rounds,
                     recover_tokens=a.recover_tokens, progress=True,
                     **({"resume": True} if a.resume else {}),
                     **({"formats": a.formats} if a.formats else {}))
    seconds = time.perf_counter() - t0
    run = out / "runs" / study
    t = pd.read_csv(run / "trials.csv")
    df = compare(t)
    done = t[t["recover_steps"].notna()] if "recover_steps" in t else t.iloc[:0]
    used = done[done.get("recover_used", pd.Series(False, index=done.index)).fillna(False).astype(bool)]
    summary = {"seconds": seconds, "formats": a.formats or "default",
               "recovered_points": len(done), "kept_recovered": len(used),
               "recover_s_mean": float(done["recover_s"].mean()) if len(done) else None,
               "methods": done["recover_method"].value_counts().to_dict() if len(done) else {},
               "run": str(run)}
    df.to_csv(out / "recover_front.csv", index=False)
    (out / "recover_front.json").write_text(json.dumps(
        {"summary": summary, "presets": df.to_dict(orient="records")}, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
