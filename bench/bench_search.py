"""Benchmark of the default search (issue 2). Prints, in one run on this machine:

(a) time per trial / time of one plain forward pass over the same evaluation tokens,
(b) cache preparation time, its size and the process's peak memory around it,
(c) for each uniform baseline, the best front point with no more memory, and its perplexity.

Run: python -m llmpareto.bench.bench_search [--trials 60] [--out bench-runs]
Caveat (from the model's publication): SmolLM2-135M's linears were published as Q4_1, so
q4_1 is lossless there and q5_* can be lossier than q4_1; that is this file, not the formats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pandas as pd


def plain_forward_seconds(settings, repeats: int = 3) -> float:
    from llmpareto.evaluators.quality import window_nll
    from llmpareto.models import load_model, resolve_model
    from llmpareto.text import read_text, tokenize_windows

    model, tok = load_model(resolve_model(settings["model"]))
    w = tokenize_windows(tok, read_text(None), settings["window"], settings["calib_tokens"],
                         settings["eval_tokens"])
    window_nll(model, w.eval, settings["batch_size"])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        window_nll(model, w.eval, settings["batch_size"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import llmpareto

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--out", default="bench-runs")
    ap.add_argument("--granularity", default="type")
    args = ap.parse_args()
    study = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    front = llmpareto.search(trials=args.trials, study=study, runs_dir=args.out,
                             granularity=args.granularity, progress=False)
    wall = time.perf_counter() - t0
    info = json.loads((Path(args.out) / study / "run.json").read_text())
    s = info["settings"]
    trials = front.trials[front.trials["state"] == "COMPLETE"]
    feas = trials[trials["feasible"]]
    per_trial = statistics.median(feas["duration_s"].iloc[1:])  # first one warms up
    fwd = plain_forward_seconds(s)
    print(f"search: {len(trials)} trials, granularity {s['granularity']}, eval tokens "
          f"{s['eval_tokens']}, wall {wall:.1f} s (model load {info['load_s']:.1f} s)")
    print(f"(a) median trial {per_trial:.3f} s / plain forward {fwd:.3f} s = "
          f"{per_trial / fwd:.3f}  (floor 1.0, aim <= 1.15)")
    c = info["cache"]
    print(f"(b) cache preparation {c['prepare_s']:.1f} s, {c['bytes'] / 1e6:.0f} MB of packed "
          f"variants; peak RSS {c['peak_rss_before_bytes'] / 1e9:.2f} GB before, "
          f"{c['peak_rss_after_bytes'] / 1e9:.2f} GB after")
    print("(c) uniform baseline vs best front point with no more memory:")
    rows = []
    for _, b in trials[trials["baseline"].fillna("") != ""].iterrows():
        cand = front.df[front.df["memory_bytes"] <= b["memory_bytes"]]
        best = cand.loc[cand["perplexity"].idxmin()] if len(cand) else None
        rows.append({
            "baseline": b["baseline"], "baseline_memory_MB": b["memory_bytes"] / 1e6,
            "baseline_perplexity": b["perplexity"],
            "front_trial": None if best is None else int(best["trial"]),
            "front_memory_MB": None if best is None else best["memory_bytes"] / 1e6,
            "front_perplexity": None if best is None else best["perplexity"],
        })
    table = pd.DataFrame(rows)
    table["perplexity_gain_%"] = 100 * (1 - table["front_perplexity"] / table["baseline_perplexity"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
