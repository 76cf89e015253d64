"""Benchmark of the distributed backends (issue 5) on the default model. Prints, on this machine:

(a) completed trials per minute with the Ray backend and 1 vs 2 workers (one CPU each),
(b) per-trial overhead of the Ray backend against the local backend (also one CPU).

Overhead = workers x mean gap between trial completions minus the mean compute of a trial
(cost + apply + quality seconds recorded on each), in the steady state (model loaded).
Run: python -m llmpareto.bench.bench_distributed [--trials 16] [--out bench-runs]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import optuna
from optuna.trial import TrialState

_COMPUTE = ("cost_s", "apply_s", "quality_s")


def _steady(db: str, study: str, workers: int) -> dict:
    """Rates and overheads from the study's own timestamps, after the first completion."""
    s = optuna.load_study(study_name=study, storage=f"sqlite:///{db}")
    done = sorted(s.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.datetime_complete)
    ends = [t.datetime_complete.timestamp() for t in done]
    span = ends[-1] - ends[0]
    compute = [sum(t.user_attrs.get(k, 0.0) for k in _COMPUTE) for t in done]
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    return {"n": len(done), "per_min": 60 * (len(done) - 1) / span if span else float("nan"),
            "compute_s": statistics.mean(compute[1:]),
            "gap_s": statistics.mean(gaps) if gaps else float("nan"),
            # with w workers a trial occupies one worker for w gaps
            "overhead_s": workers * statistics.mean(gaps) - statistics.mean(compute[1:])}


def _run(backend: str, study: str, args, workers: int = 1, **extra) -> tuple[dict, float]:
    import llmpareto

    t0 = time.perf_counter()
    llmpareto.search(backend=backend, trials=args.trials, study=study, runs_dir=args.out,
                     progress=False, dequant_cache="1GB", **extra)
    wall = time.perf_counter() - t0
    return _steady(f"{args.out}/{study}/study.db", study, workers), wall


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--out", default="bench-runs")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    torch.set_num_threads(1)  # the local backend on one CPU, like one Ray worker
    rows = {"local, 1 CPU": _run("local", f"dist-local-{stamp}", args)}
    for n in (1, 2):
        rows[f"ray, {n} worker(s) x 1 CPU"] = _run(
            "ray", f"dist-ray{n}-{stamp}", args, n, cpus_per_trial=1, max_concurrent=n)
    print(f"default model, {args.trials} trials per run, {torch.get_num_threads()} torch thread "
          f"in the local run, {len(os.sched_getaffinity(0))} CPUs on this host")
    print(f"{'run':<28}{'wall_s':>8}{'trials_per_min':>16}{'compute_s/trial':>17}"
          f"{'gap_s/trial':>13}{'overhead_s/trial':>18}")
    for name, (r, wall) in rows.items():
        print(f"{name:<28}{wall:>8.1f}{r['per_min']:>16.2f}{r['compute_s']:>17.2f}"
              f"{r['gap_s']:>13.2f}{r['overhead_s']:>18.2f}")
    local, ray1 = rows["local, 1 CPU"][0], rows["ray, 1 worker(s) x 1 CPU"][0]
    ray2 = rows["ray, 2 worker(s) x 1 CPU"][0]
    print(f"2 vs 1 Ray workers: {ray2['per_min'] / ray1['per_min']:.2f}x trials per minute")
    print(f"Ray per-trial overhead over local: {ray1['overhead_s'] - local['overhead_s']:.2f} s")
    print("trials_per_min counts completions after the first (model and cache already loaded); "
          "wall_s includes model load and cache preparation (and Ray start-up).")


if __name__ == "__main__":
    main()
