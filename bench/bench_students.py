"""Benchmark of students and distillation (issue 11) on the default model. Prints, in one run:

(a) keep 24 of 30 blocks by Block Influence against at random (5 draws): perplexity;
(b) a fixed budget of distillation steps on that student: perplexity before and after, and
    seconds per step (`llmpareto distill`);
(c) the three-way joint front (formats,sparsity,students) against the formats-only front at the
    same number of trials: hypervolume of (perplexity, memory_bytes), and what the joint front
    adds.

Run: python -m llmpareto.bench.bench_students [--steps 60] [--trials 60] [--out DIR]
     (--quick: a few steps and trials, to check that it runs)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

CALIB, EVAL = 2048, 2048


def blocks_table(keep: int, draws: int, evals: int) -> pd.DataFrame:
    from llmpareto.compress.restructure import keep_blocks
    from llmpareto.recipe import Recipe
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    runner = TrialRunner(SearchSettings(space="students", calib_tokens=CALIB, eval_tokens=evals,
                                        progress=False))
    n = runner.arch.n_layers
    bi = runner.space.influence

    def ppl(layers):
        r = Recipe({"_default": {"format": "f16"}}, structure={"layers": layers})
        return runner.run(r).metrics["perplexity"]

    rows = [{"blocks": "all", "kept": n, "perplexity": ppl(list(range(n)))},
            {"blocks": "by Block Influence", "kept": keep, "perplexity": ppl(keep_blocks(bi, keep)),
             "dropped": ",".join(map(str, sorted(set(range(n)) - set(keep_blocks(bi, keep)))))}]
    rng = np.random.default_rng(0)
    for d in range(draws):
        layers = sorted(rng.choice(n, keep, replace=False).tolist())
        rows.append({"blocks": f"random draw {d}", "kept": keep, "perplexity": ppl(layers),
                     "dropped": ",".join(map(str, sorted(set(range(n)) - set(layers))))})
    return pd.DataFrame(rows)


def distill_table(out: str, keep: int, steps: int, evals: int) -> pd.DataFrame:
    import llmpareto
    from llmpareto.search.distill_run import distill_trial

    study = f"students-distill-{time.strftime('%H%M%S')}"
    llmpareto.search(space="students", student_blocks=[30, keep], student_mlp_ratios=[1.0],
                     student_heads=[3], calib_tokens=CALIB, eval_tokens=evals, trials=1,
                     study=study, runs_dir=out, progress=False)
    run = Path(out) / study
    before = pd.read_csv(run / "trials.csv").iloc[0]
    r = distill_trial(run, 0, steps, lr=1e-4, batch_size=4, progress=False)
    return pd.DataFrame([{"student": before["baseline"], "steps": steps,
                          "perplexity_before": before["perplexity"],
                          "perplexity_after": r["distilled_perplexity"],
                          "loss_first": r["first_loss"], "loss_last": r["last_loss"],
                          "seconds_per_step": r["seconds_per_step"]}])


def fronts_table(out: str, trials: int, evals: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    import llmpareto
    from llmpareto.pareto import hypervolume_2d

    fronts = {}
    for space in ("formats", "formats,sparsity,students"):
        study = f"students-{space.replace(',', '-')}-{time.strftime('%H%M%S')}"
        front = llmpareto.search(space=space, calib_tokens=CALIB, eval_tokens=evals,
                                 sparsity_levels=[0.0, 0.25, 0.5], trials=trials, study=study,
                                 runs_dir=out, progress=False)
        t = front.trials[front.trials["state"] == "COMPLETE"].copy()
        fronts[space] = (front.df.copy(), t, json.loads((Path(out) / study / "run.json")
                                                       .read_text())["settings"])
    dense = fronts["formats"][1]
    f16 = dense[dense["baseline"] == "uniform f16"].iloc[0]
    ref = (2 * float(f16["perplexity"]), float(f16["memory_bytes"]))  # 2x the f16 perplexity
    rows = []
    for space, (df, t, _) in fronts.items():
        pts = df[["perplexity", "memory_bytes"]].to_numpy()
        par = [c for c in df.columns if c.startswith(("param:sparsity:", "param:student:"))]
        rows.append({"space": space, "trials": len(t), "front_points": len(df),
                     "hypervolume": hypervolume_2d(pts / np.array(ref), (1.0, 1.0)),
                     "front_points_not_dense_teacher": int(_compressed_more(df, par).sum())})
    joint_df = fronts["formats,sparsity,students"][0]
    par = [c for c in joint_df.columns if c.startswith(("param:sparsity:", "param:student:"))]
    adds = joint_df[_compressed_more(joint_df, par)][["trial", "perplexity", "memory_bytes",
                                                       *par]]
    return pd.DataFrame(rows), adds


def _compressed_more(df: pd.DataFrame, par: list[str]) -> pd.Series:
    """Front rows that prune or cut a student (beyond what formats alone do)."""
    out = pd.Series(False, index=df.index)
    for c in par:
        if c.startswith("param:sparsity:"):
            out |= df[c].fillna(0) > 0
        else:
            out |= df[c].notna() & (df[c] != df[c].max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60, help="distillation steps in (b)")
    ap.add_argument("--trials", type=int, default=60, help="trials per search in (c)")
    ap.add_argument("--out", default="bench-runs/students")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    global CALIB
    evals, draws = EVAL, 5
    if a.quick:
        CALIB, evals, draws, a.steps, a.trials = 512, 512, 1, 2, 14
    Path(a.out).mkdir(parents=True, exist_ok=True)
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False}
    t0 = time.perf_counter()
    print(f"(a) keep 24 of 30 blocks (f16, {evals} evaluation tokens):", flush=True)
    print(blocks_table(24, draws, evals).to_string(**fmt), flush=True)
    print(f"\n(b) distillation of the 24-block student from the base model, {a.steps} steps:")
    print(distill_table(a.out, 24, a.steps, evals).to_string(**fmt), flush=True)
    print(f"\n(c) fronts at {a.trials} trials each (hypervolume of perplexity and memory_bytes, "
          "normalised by 2x the f16 perplexity and the f16 memory):")
    table, adds = fronts_table(a.out, a.trials, evals)
    print(table.to_string(**fmt))
    print("    joint front points that prune or are students:")
    print(adds.to_string(**fmt) if len(adds) else "    none")
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
