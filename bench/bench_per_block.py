"""Benchmark of per-block structure (issue 27) on the default model: AMC-style per-block MLP
widths and KV groups, searched with formats against a device's predicted decode latency, and
run in llama.cpp (its `deci` architecture) on this host.

(a) Three searches with --objectives perplexity,latency_ms on --device (default
    raspberry-pi-5), the same trials each: formats alone, formats with homogeneous students
    (--student-granularity model) and formats with per-block students (block). For latency
    targets spread over the formats-only front: the best point of each front at no more
    predicted latency, perplexity and KL to the base on the evaluation windows and on the
    evaluation text (another domain, never calibrated on).
(b) Whether per-block structure is on the per-block search's front: its front points that
    cut a block's MLP or KV groups differently from another block.
(c) Up to three per-block front points exported to GGUF and timed in llama.cpp on this host
    (decode ms/token at the run's context), each against the same recipe without its width
    and KV cuts (same kept blocks and formats), and against the prediction of a llama.cpp
    profile of this host calibrated in the same run (`profile-host --runtime llamacpp`).

Run: python -m llmpareto.bench.bench_per_block [--trials 40] [--device raspberry-pi-5]
     [--recover-steps N [--recover-rounds R] [--recover-tokens T]] [--out DIR] (--quick: few trials and tokens, to check that it runs)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

SEARCHES = {"formats": {"space": "formats"},
            "homogeneous students": {"space": "formats,students",
                                     "student_granularity": "model"},
            "per-block students": {"space": "formats,students",
                                   "student_granularity": "block"}}
QUALITY = ("perplexity", "kl_nats", "eval_text_perplexity", "eval_text_kl_nats",
           "recovered_perplexity", "recovered_eval_text_perplexity",
           "recovered_eval_text_kl_nats")


def per_block_rows(df: pd.DataFrame) -> pd.Series:
    """Rows whose student cuts some block's MLP or KV groups differently from another's."""
    cols = [c for c in df.columns if c.startswith(("param:student:mlp_ratio.",
                                                   "param:student:heads."))]
    if not cols:
        return pd.Series(False, index=df.index)
    out = pd.Series(False, index=df.index)
    for cut in ("mlp_ratio", "heads"):
        sub = df[[c for c in cols if c.startswith(f"param:student:{cut}.")]]
        out |= sub.nunique(axis=1) > 1
    return out


def at_latency(fronts: dict[str, pd.DataFrame], targets: list[float]) -> pd.DataFrame:
    rows = []
    for target in targets:
        for name, df in fronts.items():
            ok = df[df["latency_ms"] <= target * (1 + 1e-9)]
            if ok.empty:
                rows.append({"latency_target_ms": target, "search": name})
                continue
            b = ok.loc[effective(ok).idxmin()]
            rows.append({"latency_target_ms": target, "search": name, "trial": int(b["trial"]),
                         "latency_ms": b["latency_ms"], "memory_MB": b["memory_bytes"] / 1e6,
                         **{q: b.get(q, np.nan) for q in QUALITY if q in df.columns},
                         "per_block": bool(per_block_rows(ok.loc[[b.name]]).iloc[0])})
    return pd.DataFrame(rows)


def effective(df: pd.DataFrame) -> pd.Series:
    """A point's perplexity as the user gets it: after recovery, the recovered one where the
    point kept recovered weights, else its post-training one."""
    return df["recovered_perplexity"].fillna(df["perplexity"]) \
        if "recovered_perplexity" in df.columns else df["perplexity"]


def hypervolumes(fronts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Hypervolume of (perplexity, latency_ms) per search and of the union, with the effective
    perplexity (after recovery where it ran), against one reference: 2x the lowest
    post-training front perplexity and the slowest front point."""
    from llmpareto.pareto import hypervolume_2d

    base = min(float(f["perplexity"].min()) for f in fronts.values())
    ref = np.array([2 * base, max(float(f["latency_ms"].max()) for f in fronts.values())])
    union = pd.concat([f.assign(search=n) for n, f in fronts.items()], ignore_index=True)
    pts = np.column_stack([effective(union).to_numpy(), union["latency_ms"].to_numpy()])
    on = [i for i in range(len(pts)) if not any((pts[j] <= pts[i]).all() and
                                                (pts[j] < pts[i]).any() for j in range(len(pts)))]
    counts = union.iloc[on]["search"].value_counts()
    rows = [{"search": n, "front_points": len(f),
             "hypervolume": hypervolume_2d(np.column_stack(
                 [effective(f).to_numpy(), f["latency_ms"].to_numpy()]) / ref, (1.0, 1.0)),
             "points_on_union_front": int(counts.get(n, 0))} for n, f in fronts.items()]
    rows.append({"search": "union", "front_points": len(on),
                 "hypervolume": hypervolume_2d(pts[on] / ref, (1.0, 1.0)),
                 "points_on_union_front": len(on)})
    return pd.DataFrame(rows)


def measured(run: Path, df: pd.DataFrame, n: int, host_profile, rounds: int = 5
             ) -> pd.DataFrame:
    """Up to `n` per-block front points and the same recipes without width/KV cuts, timed in
    llama.cpp here, with the host profile's prediction of each."""
    from llmpareto.budget import Workload
    from llmpareto.evaluators import Candidate
    from llmpareto.evaluators.cost import LatencyEnergyEvaluator
    from llmpareto.evaluators.llamacpp import gguf_speeds
    from llmpareto.front import Front
    from llmpareto.gguf_write import write_gguf
    from llmpareto.recipe import Recipe
    from llmpareto.search.workbench import Workbench

    pts = df[per_block_rows(df)].sort_values("latency_ms")
    if pts.empty:
        return pd.DataFrame()
    pick = pts.iloc[np.unique(np.linspace(0, len(pts) - 1, min(n, len(pts))).round().astype(int))]
    front, rb = Front.load(run), Workbench.from_run(run)
    context = rb.settings.context
    ev = LatencyEnergyEvaluator(rb.arch, host_profile, Workload(context=context))
    jobs = []
    out_dir = run / "exports"
    out_dir.mkdir(exist_ok=True)
    for _, row in pick.iterrows():
        recipe = front.recipe(int(row["trial"]))
        flat = Recipe(recipe.modules, structure={k: v for k, v in recipe.structure.items()
                                                 if k == "layers"})
        for label, r in (("per-block", recipe), ("no width cuts", flat)):
            built = rb.build(r)
            path = out_dir / f"trial-{int(row['trial'])}-{label.replace(' ', '-')}.gguf"
            write_gguf(path, built.model, built.cache, built.formats, built.source,
                       built.tokenizer)
            pred = ev.evaluate(Candidate(r, rb.arch.formats_for(r)))["latency_ms"]
            jobs.append({"trial": int(row["trial"]), "recipe": label, "path": str(path),
                         "size_MB": path.stat().st_size / 1e6, "predicted_host_ms": pred,
                         "predicted_device_ms": row["latency_ms"] if label == "per-block"
                         else np.nan})
    speeds = gguf_speeds([j["path"] for j in jobs], contexts=(context,), rounds=rounds)
    for j, s in zip(jobs, speeds):
        j["measured_host_ms"] = s["measured_latency_ms"]
        j["error_pct"] = 100 * (j["predicted_host_ms"] / j["measured_host_ms"] - 1)
        del j["path"]
    t = pd.DataFrame(jobs)
    base = t[t["recipe"] == "no width cuts"].set_index("trial")["measured_host_ms"]
    t["speedup_vs_no_cuts"] = t["trial"].map(base) / t["measured_host_ms"]
    return t


def main(argv: list[str] | None = None) -> None:
    import llmpareto
    from llmpareto.evaluators.host import measure_host_profile
    from llmpareto.front import Front

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--device", default="raspberry-pi-5")
    ap.add_argument("--measure", type=int, default=3, help="per-block front points timed in (c)")
    ap.add_argument("--rounds", type=int, default=5, help="(c): timing rounds over all files "
                    "(each file's fastest counts: a shared machine only slows runs down)")
    ap.add_argument("--out", default="bench-runs/per-block")
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="recover each front in its search (--recover-steps); (a) then shows "
                         "quality after recovery too")
    ap.add_argument("--recover-rounds", type=int, default=2,
                    help="the searches' --recover-rounds (1: every point near the front once)")
    ap.add_argument("--recover-tokens", type=int, default=4096,
                    help="the searches' --recover-tokens (calibration tokens recovery learns on)")
    ap.add_argument("--resume", metavar="STAMP", help="continue the searches of an earlier "
                    "run of this benchmark (their study names end in STAMP), e.g. to recover "
                    "them with --recover-steps")
    ap.add_argument("--only", help="comma list of searches to run: formats, homogeneous, "
                    "per-block (default: all)")
    ap.add_argument("--strategy", default="auto", help="the searches' --strategy")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    common = {"device": a.device, "objectives": "perplexity,latency_ms", "trials": a.trials,
              "runs_dir": a.out, "progress": False, "recover_steps": a.recover_steps,
              "recover_rounds": a.recover_rounds, "recover_tokens": a.recover_tokens,
              "strategy": a.strategy}
    if a.quick:
        common.update(trials=12, eval_tokens=512, calib_tokens=512, eval_text_tokens=512,
                      formats="q8_0,q4_0,q4_K", presets="none", student_blocks="30,27")
        a.measure = 1
    Path(a.out).mkdir(parents=True, exist_ok=True)
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False}
    t0 = time.perf_counter()
    fronts, runs, secs = {}, {}, {}
    stamp = a.resume or time.strftime("%H%M%S")
    only = a.only.split(",") if a.only else [n.split()[0] for n in SEARCHES]
    for name, extra in SEARCHES.items():
        if name.split()[0] not in only:
            continue
        study = f"per-block-{name.split()[0]}-{stamp}"
        s0 = time.perf_counter()
        llmpareto.search(study=study, resume=bool(a.resume), **common, **extra)
        secs[name] = time.perf_counter() - s0
        runs[name] = Path(a.out) / study
        fronts[name] = Front.load(runs[name]).df
        print(f"{name}: {len(fronts[name])} front points in {secs[name]:.0f} s "
              f"({runs[name]})", flush=True)
    if "per-block students" not in fronts:
        print(at_latency(fronts, sorted(np.concatenate([f["latency_ms"].to_numpy()
                                                        for f in fronts.values()])))
              .to_string(**fmt))
        return
    lat = np.concatenate([f["latency_ms"].to_numpy() for f in fronts.values()])
    targets = sorted({float(np.quantile(lat, q)) for q in (0.0, 0.25, 0.5, 0.75)})
    print(f"\n(a) best point at no more predicted latency on {a.device} (quality on the "
          "evaluation windows and on the evaluation text):")
    print(at_latency(fronts, targets).to_string(**fmt), flush=True)
    print("\n(a2) hypervolume of (perplexity, recovered where kept; latency_ms), normalised by 2x the lowest "
          "front perplexity and the slowest front point, and where the union front's points come from:")
    print(hypervolumes(fronts).to_string(**fmt), flush=True)
    pb = fronts["per-block students"]
    on = pb[per_block_rows(pb)]
    print(f"\n(b) per-block front: {len(on)} of {len(pb)} points cut blocks differently")
    if len(on):
        cols = ["trial", "latency_ms", "memory_bytes", "perplexity", "kl_nats"]
        print(on[[c for c in cols if c in on.columns]].to_string(**fmt))
    print("\n(c) llama.cpp on this host: per-block front points vs the same recipe without "
          "width/KV cuts; prediction of a llama.cpp profile of this host calibrated now:",
          flush=True)
    host = measure_host_profile("llamacpp", quick=a.quick)
    table = measured(runs["per-block students"], pb, a.measure, host, a.rounds)
    print(table.to_string(**fmt) if len(table) else "    no per-block point on the front")
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
