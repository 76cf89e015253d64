"""Benchmark of the search strategies (issue 13) on the default model. Every strategy gets the
same number of scored trials (no baselines among them); prints, per --granularity:

(a) front hypervolume (perplexity vs memory_bytes) after 16 trials and after all, and its
    ratio to random's, for one fixed reference point (1.1x the perplexity of uniform q4_0,
    the memory of uniform q8_0: the region where compressing pays) and a wide one (1.5x the
    perplexity of uniform f16, the memory of uniform f16); wall time, the profile's cost;
(b) perplexity at the size of uniform q4_0 and at three memory budgets between uniform q4_0
    and q8_0: each strategy's best point within the budget, and the best uniform format or
    llama.cpp preset within it;
(c) each llama.cpp preset against each strategy's best point of no more memory.

Run: python -m llmpareto.bench.bench_strategies [--trials 60] [--granularity type,module]
     [--strategies knapsack,evolve,nsga2,tpe,random] [--eval-tokens 1024] [--quick]
Caveat: SmolLM2-135M's linears were published as Q4_1, so q4_1 is lossless on this model only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from llmpareto.pareto import hypervolume_2d


def _complete(run: Path) -> pd.DataFrame:
    t = pd.read_csv(run / "trials.csv")
    return t[t["state"] == "COMPLETE"].sort_values("trial").reset_index(drop=True)


def _points(t: pd.DataFrame) -> np.ndarray:
    f = t[t["feasible"] & np.isfinite(t["perplexity"])]
    return f[["perplexity", "memory_bytes"]].to_numpy(float)


def _best_within(t: pd.DataFrame, memory: float) -> float:
    f = t[t["feasible"] & (t["memory_bytes"] <= memory)]
    return float(f["perplexity"].min()) if len(f) else float("nan")


def baselines(common: dict, out: str, tag: str) -> pd.DataFrame:
    """Uniform formats and llama.cpp presets, scored once (the same recipes at any granularity)."""
    import llmpareto
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    s = {**common, "study": f"{tag}-baselines", "runs_dir": out, "strategy": "random"}
    runner = TrialRunner(SearchSettings(**s))
    n = len(runner.space.baselines()) + len(runner.preset_baselines())
    del runner
    llmpareto.search(**s, trials=n)
    return _labelled(Path(out) / s["study"])


def _labelled(run: Path) -> pd.DataFrame:
    t = _complete(run)
    info = json.loads((run / "run.json").read_text())
    t = t[t["baseline"].fillna("") != ""].copy()
    t["bits_per_weight"] = t["weights_bytes"] * 8 / info["model"]["n_params"]
    return t


def run_strategy(common: dict, out: str, tag: str, strategy: str, granularity: str,
                 trials: int, profile: Path | None, tokens: int) -> tuple[pd.DataFrame, dict]:
    import llmpareto

    study = f"{tag}-{granularity}-{strategy}"
    t0 = time.perf_counter()
    llmpareto.search(**common, study=study, runs_dir=out, strategy=strategy, trials=trials,
                     granularity=granularity, baselines=False, presets="none",
                     sensitivity=str(profile) if profile else None, sensitivity_tokens=tokens)
    wall = time.perf_counter() - t0
    info = json.loads((Path(out) / study / "run.json").read_text())
    return _complete(Path(out) / study), {"wall_s": wall, "strategy": info["strategy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--granularity", default="type,module")
    ap.add_argument("--strategies", default="knapsack,evolve,nsga2,tpe,random")
    ap.add_argument("--module-strategies", default="knapsack,evolve,nsga2,random",
                    help="strategies at --granularity module (each costs minutes)")
    ap.add_argument("--out", default="bench-runs")
    ap.add_argument("--reuse", default="",
                    help="TAG of an earlier run of this benchmark in --out: reuse its baselines "
                         "and its strategy runs, except those named in --rerun")
    ap.add_argument("--rerun", default="", help="strategies to run again under --reuse")
    ap.add_argument("--profile", default="",
                    help="reuse sensitivity profiles, e.g. type=RUN/sensitivity.json,module=...")
    ap.add_argument("--quick", action="store_true",
                    help="16 trials, 512 tokens, knapsack and random at type granularity")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.eval_tokens, args.granularity = 16, 512, "type"
        args.strategies = "knapsack,random"
    tag = f"strat-{time.strftime('%Y%m%d-%H%M%S')}"
    common = {"eval_tokens": args.eval_tokens, "progress": False}
    rerun = set(filter(None, args.rerun.split(",")))
    old = Path(args.out) / f"{args.reuse}-baselines"
    base = baselines(common, args.out, tag) if not args.reuse else _labelled(old)
    label = base.set_index("baseline")
    f16, q4, q8 = (label.loc[f"uniform {f}"] for f in ("f16", "q4_0", "q8_0"))
    ref = (1.1 * q4["perplexity"], q8["memory_bytes"])
    wide = (1.5 * f16["perplexity"], f16["memory_bytes"])
    budgets = [q4["memory_bytes"] + (q8["memory_bytes"] - q4["memory_bytes"]) * k / 4
               for k in (0, 1, 2, 3)]
    print(f"eval tokens {args.eval_tokens}, {args.trials} trials per strategy; hypervolume "
          f"reference: perplexity {ref[0]:.3f}, memory {ref[1] / 1e6:.1f} MB (wide: "
          f"{wide[0]:.3f}, {wide[1] / 1e6:.1f} MB); uniform q4_0 {q4['perplexity']:.3f} at "
          f"{q4['memory_bytes'] / 1e6:.1f} MB, q8_0 {q8['perplexity']:.3f} at "
          f"{q8['memory_bytes'] / 1e6:.1f} MB")
    summary = {"reference": ref, "wide_reference": wide, "budgets_bytes": budgets,
               "baselines": base.to_dict("records")}
    for gran in args.granularity.split(","):
        names = (args.module_strategies if gran == "module" else args.strategies).split(",")
        tokens = 64 if gran == "module" else 128
        given = dict(kv.split("=", 1) for kv in args.profile.split(",") if "=" in kv)
        profile, rows, fronts = (Path(given[gran]) if gran in given else None), [], {}
        for name in names:
            prior = Path(args.out) / f"{args.reuse}-{gran}-{name}"
            if args.reuse and name not in rerun and prior.is_dir():
                t, old_info = _complete(prior), json.loads((prior / "run.json").read_text())
                info = {"wall_s": old_info["search_energy"].get("duration_s", float("nan")),
                        "strategy": old_info["strategy"]}
            else:
                t, info = run_strategy(common, args.out, tag, name, gran, args.trials, profile,
                                       tokens)
            sens = info["strategy"].get("sensitivity")
            if sens and profile is None:
                profile = Path(args.out) / f"{tag}-{gran}-{name}" / "sensitivity.json"
            fronts[name] = t
            rows.append({"strategy": name, "hv@16": hypervolume_2d(_points(t.iloc[:16]), ref),
                         "hv@all": hypervolume_2d(_points(t), ref), "trials": len(t),
                         "wide_hv@16": hypervolume_2d(_points(t.iloc[:16]), wide),
                         "wall_s": info["wall_s"],
                         "sensitivity_s": sens["seconds"] if sens else 0.0,
                         **{f"ppl@{b / 1e6:.0f}MB": _best_within(t, b) for b in budgets}})
        table = pd.DataFrame(rows)
        if "random" in set(table["strategy"]):
            r = table.set_index("strategy").loc["random"]
            for col in ("hv@16", "hv@all", "wide_hv@16"):
                table[f"{col}/random"] = table[col] / r[col]
        base_row = {"strategy": "best uniform/preset", **{f"ppl@{b / 1e6:.0f}MB":
                                                          _best_within(base, b) for b in budgets}}
        table = pd.concat([table, pd.DataFrame([base_row])], ignore_index=True)
        print(f"\n== granularity {gran} ==\n(a, b) hypervolume (perplexity x bytes) and "
              "perplexity at memory budgets:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        presets = base[base["baseline"].str.startswith("llama.cpp")]
        rows = []
        for _, p in presets.iterrows():
            row = {"preset": p["baseline"], "memory_MB": p["memory_bytes"] / 1e6,
                   "bits_per_weight": p["bits_per_weight"],
                   "perplexity": p["perplexity"]}
            for name, t in fronts.items():
                best = _best_within(t, p["memory_bytes"])
                row[f"{name}_gain_%"] = 100 * (1 - best / p["perplexity"])
            rows.append(row)
        print("(c) llama.cpp presets vs each strategy's best point with no more memory:")
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        summary[gran] = table.to_dict("records")
    (Path(args.out) / f"{tag}.json").write_text(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
