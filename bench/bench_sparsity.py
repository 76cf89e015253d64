"""Benchmark of the sparsity space (issue 10) on the default model. Prints, in one run:

(a) perplexity at 50% unstructured and at 2:4 for magnitude, Wanda and SparseGPT (uniform,
    f16 storage), with each method's pruning time;
(b) the searched non-uniform allocation against uniform and OWL at the same mean sparsity
    (a --space sparsity search, objectives perplexity and nonzero_params);
(c) a joint formats x sparsity (2:4) front on rtx-4090 (a runtime with 2:4 kernels) and on
    raspberry-pi-5 (none), plotted to <out>/joint_fronts.png, with the joint cache's
    preparation time and peak memory.

Run: python -m llmpareto.bench.bench_sparsity [--trials 80] [--joint-trials 40] [--out DIR]
     (--quick: a few trials each, to check that it runs)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

# tokens; more calibration than the search default (Wanda's paper: 128 x 2048); searches
# evaluate on the search default (2048) to keep trials short
CALIB, EVAL, SEARCH_EVAL = 2048, 4096, 2048
LEVELS = [round(0.1 * i, 1) for i in range(9)]


def methods_table(out: str, calibs: list[int], evals: int) -> tuple[pd.DataFrame, dict]:
    from llmpareto.recipe import Recipe
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    rows, zeros = [], {}
    for calib in calibs:
        for method in ("magnitude", "wanda", "sparsegpt"):
            if method == "magnitude" and calib != calibs[0]:
                continue  # needs no calibration text
            runner = TrialRunner(SearchSettings(space="sparsity", sparsity_method=method,
                                                calib_tokens=calib, eval_tokens=evals,
                                                runs_dir=out, progress=False))
            if not rows:
                dense = runner.run(Recipe.uniform("f16")).metrics["perplexity"]
                rows.append({"method": "dense f16", "calib_tokens": 0, "pattern": "-",
                             "perplexity": dense, "prune_s": 0.0})
            if method == "wanda" and not zeros:
                zeros = zeros_kept(runner.cache)
            for pattern, choice in (("50% unstructured", {"sparsity": 0.5}),
                                    ("2:4", {"pattern": "2:4"})):
                t0 = runner.cache.prepare_seconds
                r = runner.run(Recipe({"_default": {"format": "f16"},
                                       r"re:.*layers\..*": {"format": "f16", **choice}}))
                rows.append({"method": method, "pattern": pattern,
                             "calib_tokens": calib if method != "magnitude" else 0,
                             "perplexity": r.metrics["perplexity"],
                             "prune_s": runner.cache.prepare_seconds - t0})
            del runner
    return pd.DataFrame(rows), zeros


def zeros_kept(cache, every: int = 5) -> dict[str, float]:
    """Share of the pruned zeros (50% Wanda) still exactly 0 after each format's round trip,
    over the block projections of every `every`-th layer."""
    from llmpareto.formats import GGUF_FORMATS, get_format

    fqns = [t.fqn for t in cache.arch.linears if t.layer % every == 0]
    out = {}
    for fmt in GGUF_FORMATS:
        kept = total = 0
        for fqn in fqns:
            w = cache.pruned(fqn, ("unstructured", 0.5)).numpy()
            f = get_format(fmt)
            if not f.fits(w.shape[1]):
                continue
            back = f.dequantize(f.quantize(w), w.shape)
            zero = w == 0
            kept += int((back[zero] == 0).sum())
            total += int(zero.sum())
        out[fmt] = kept / total if total else float("nan")
    return out


def allocation_table(out: str, trials: int, method: str, granularity: str) -> pd.DataFrame:
    import llmpareto

    study = f"alloc-{granularity}-{time.strftime('%H%M%S')}"
    front = llmpareto.search(space="sparsity", sparsity_method=method, granularity=granularity,
                             sparsity_levels=LEVELS,
                             objectives=["perplexity", "nonzero_params"], calib_tokens=CALIB,
                             eval_tokens=SEARCH_EVAL, trials=trials, study=study, runs_dir=out,
                             progress=False)
    t = front.trials[front.trials["state"] == "COMPLETE"].copy()
    t["baseline"] = t["baseline"].fillna("")
    rows = []
    for target in (0.4, 0.5, 0.6):
        label = f"{round(100 * target)}% {method}"
        uni = t[t["baseline"] == f"uniform {label}"].iloc[0]
        owl = t[t["baseline"] == f"OWL {label}"]
        budget = uni["nonzero_params"]
        searched = t[(t["baseline"] == "") & (t["nonzero_params"] <= budget)]
        best = searched.loc[searched["perplexity"].idxmin()] if len(searched) else None
        rows.append({
            "granularity": granularity, "mean_sparsity": target,
            "uniform_ppl": uni["perplexity"],
            "owl_ppl": owl["perplexity"].iloc[0] if len(owl) else float("nan"),
            "owl_nonzero_vs_uniform": (owl["nonzero_params"].iloc[0] / budget
                                       if len(owl) else float("nan")),
            "searched_ppl": float("nan") if best is None else best["perplexity"],
            "searched_trial": None if best is None else int(best["trial"]),
            "searched_nonzero_vs_uniform": (float("nan") if best is None
                                            else best["nonzero_params"] / budget),
        })
    return pd.DataFrame(rows)


def joint_fronts(out: str, trials: int) -> tuple[pd.DataFrame, dict]:
    import llmpareto

    studies, caches = {}, {}
    for device in ("rtx-4090", "raspberry-pi-5"):
        study = f"joint-{device}-{time.strftime('%H%M%S')}"
        llmpareto.search(space="formats,sparsity", sparsity_pattern="2:4",
                         sparsity_method="sparsegpt", device=device,
                         objectives=["perplexity", "memory_bytes"], calib_tokens=CALIB,
                         eval_tokens=SEARCH_EVAL, trials=trials, study=study, runs_dir=out,
                         progress=False)
        studies[device] = Path(out) / study
        caches[device] = json.loads((studies[device] / "run.json").read_text())["cache"]
    return plot_fronts(studies, Path(out) / "joint_fronts.png"), caches


def plot_fronts(runs: dict[str, Path], png: Path) -> pd.DataFrame:
    """One panel per device: every trial (x: 2:4 in some modules), the front in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmpareto.front import Front

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), sharey=True)
    rows = []
    for ax, (device, run) in zip(axes, runs.items()):
        front = Front.load(run)
        t = front.trials[front.trials["state"] == "COMPLETE"].copy()
        sp_cols = [c for c in t.columns if c.startswith("param:sparsity:")]
        t["pruned"] = (t[sp_cols] > 0).any(axis=1)
        f = t[t["trial"].isin(front.df["trial"])].sort_values("memory_bytes")
        top = 4 * float(f["perplexity"].min())  # tq2_0-like points off the chart
        for pruned, marker in ((False, "o"), (True, "x")):
            sel = t[(t["pruned"] == pruned) & (t["perplexity"] <= top)]
            ax.scatter(sel["memory_bytes"] / 1e6, sel["perplexity"], marker=marker, s=22,
                       color="0.6", label=("2:4 in some modules" if pruned else "dense"))
        shown = f[f["perplexity"] <= top]
        ax.step(shown["memory_bytes"] / 1e6, shown["perplexity"], where="post", color="C3",
                label="Pareto front")
        ax.scatter(shown["memory_bytes"] / 1e6, shown["perplexity"], color="C3", s=30, zorder=3)
        ax.set_ylim(top=top)
        ax.set_title(f"{device}: {int(f['pruned'].sum())} of {len(f)} front points pruned")
        ax.set_xlabel("memory_bytes (MB, weights + KV cache at 2048)")
        rows.append({"device": device, "trials": len(t), "front_points": len(f),
                     "pruned_on_front": int(f["pruned"].sum()),
                     "pruned_trials": int(t["pruned"].sum()),
                     "min_memory_dense_MB": t[~t["pruned"]]["memory_bytes"].min() / 1e6,
                     "min_memory_pruned_MB": t[t["pruned"]]["memory_bytes"].min() / 1e6,
                     "f16_2of4_MB": t[t["baseline"].fillna("").str.startswith("uniform 2:4")]
                     ["memory_bytes"].min() / 1e6})
    axes[0].set_ylabel(f"perplexity (up to {4}x the best)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=80, help="allocation search trials")
    ap.add_argument("--joint-trials", type=int, default=40)
    ap.add_argument("--granularity", default="type,block",
                    help="allocation searches to run, comma-separated")
    ap.add_argument("--out", default="bench-runs/sparsity")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    global CALIB, EVAL, SEARCH_EVAL, LEVELS
    if a.quick:  # checks that every part runs: few tokens, few levels, few trials
        CALIB, EVAL, SEARCH_EVAL, LEVELS = 512, 512, 512, [0.0, 0.4, 0.5, 0.6]
        a.trials, a.joint_trials, a.granularity = 8, 8, "type"
    calib, evals = CALIB, EVAL
    Path(a.out).mkdir(parents=True, exist_ok=True)
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False}
    t0 = time.perf_counter()
    calibs = [calib] if a.quick else [512, calib]  # the search default, and more
    m, zeros = methods_table(a.out, calibs, evals)
    print("(a) uniform pruning of every block projection, f16 storage, "
          f"{evals} evaluation tokens:", flush=True)
    print(m.to_string(**fmt), flush=True)
    print("    pruned zeros still 0 after quantizing (50% Wanda, every 5th block): " +
          ", ".join(f"{k} {100 * v:.1f}%" for k, v in zeros.items()), flush=True)
    big = m[(m["method"] != "dense f16") & (m["calib_tokens"].isin([0, calib]))]
    best = big.groupby("method")["perplexity"].mean().idxmin()
    print(f"\n(b) allocation at the same mean sparsity ({best}, {a.trials} trials each):")
    alloc = pd.concat([allocation_table(a.out, a.trials, best, g)
                       for g in a.granularity.split(",")])
    print(alloc.to_string(**fmt), flush=True)
    print(f"\n(c) joint formats x 2:4 sparsity fronts ({a.joint_trials} trials each), plot "
          f"{Path(a.out) / 'joint_fronts.png'}:")
    fronts, caches = joint_fronts(a.out, a.joint_trials)
    print(fronts.to_string(**fmt))
    for device, c in caches.items():
        print(f"    {device} cache: prepared {c['prepare_s']:.1f} s before the trials, "
              f"{c['prepare_total_s']:.1f} s in all; {c['bytes_end'] / 1e9:.2f} GB held at the "
              f"end (bound {c['bytes_bound'] / 1e9:.0f} GB, {c['remade']} variants remade); "
              f"peak RSS {c['peak_rss_after_bytes'] / 1e9:.2f} GB after preparing, "
              f"{c['peak_rss_end_bytes'] / 1e9:.2f} GB at the end")
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
