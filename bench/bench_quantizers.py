"""Benchmark of the quantizers (issue 12) on the default model. Prints, in one run:

(a) llama.cpp's presets (the per-tensor types llama-quantize assigns this model), quantized
    without (rtn) and with an importance matrix: perplexity, bits per weight, file bytes;
(b) uniform q4_0, q3_K and int3_g64 with rtn, imatrix and gptq: perplexity and preparation
    time (calibration statistics, then quantizing every tensor), and a second run's time with
    the on-disk variants;
(c) a formats search with the chosen quantizer against the presets in the same run: for each
    preset, the front point with no larger weights and its perplexity gain.

Run: python -m llmpareto.bench.bench_quantizers [--trials 60] [--quantizer imatrix] [--out DIR]
     (--quick: fewer tokens and trials, to check that it runs)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

CALIB = 2048  # GPTQ needs >= 1536 (the widest input, down_proj); the same windows for all


def _runner(quantizer: str, evals: int, calib: int, **kw):
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    t0 = time.perf_counter()
    r = TrialRunner(SearchSettings(quantizer=quantizer, calib_tokens=calib, eval_tokens=evals,
                                   progress=False, **kw))
    r.load_s = time.perf_counter() - t0
    return r


def _score(runner, recipe) -> dict:
    c = runner.cache
    before = c.prepare_seconds
    t0 = time.perf_counter()
    m = runner.run(recipe).metrics
    return {"perplexity": m["perplexity"], "weights_bytes": int(m["weights_bytes"]),
            "bits_per_weight": 8 * m["weights_bytes"] / runner.arch.n_params,
            "quantize_s": c.prepare_seconds - before, "trial_s": time.perf_counter() - t0}


def presets_table(evals: int, calib: int) -> pd.DataFrame:
    rows = []
    for q in ("rtn", "imatrix"):
        runner = _runner(q, evals, calib)
        t0 = time.perf_counter()
        presets = runner.preset_baselines()
        presets_s = time.perf_counter() - t0
        for label, _, recipe in presets:
            rows.append({"preset": label.removeprefix("llama.cpp ").removesuffix(" imatrix"),
                         "quantizer": q, **_score(runner, recipe),
                         "llama_cpp_presets_s": round(presets_s, 1)})
        del runner
    return pd.DataFrame(rows)


def uniform_table(evals: int, calib: int) -> pd.DataFrame:
    from llmpareto.recipe import Recipe

    rows = []
    root = os.environ["LLMPARETO_CACHE"]
    for q in ("rtn", "imatrix", "gptq"):
        os.environ["LLMPARETO_CACHE"] = f"{root}/uniform-{q}"  # nothing from (a) on disk
        for second in (False, True):  # the second run reads its variants from disk
            runner = _runner(q, evals, calib, presets="none")
            for fmt in ("q4_0", "q3_K", "int3_g64"):
                note = ""
                if q == "gptq" and fmt == "q3_K":
                    note = "gptq cannot target K-quants: llama.cpp's quantizer, no imatrix"
                if q == "imatrix" and fmt.startswith("int"):
                    note = "int formats take no imatrix: round-to-nearest"
                r = _score(runner, Recipe({"_default": {"format": fmt}}))
                row = {"format": fmt, "quantizer": q, "run": "second" if second else "first",
                       "calibrate_s": runner.calibrate_s, **r, "note": note}
                if second:
                    rows[-3 + ["q4_0", "q3_K", "int3_g64"].index(fmt)].update(
                        second_calibrate_s=runner.calibrate_s, second_quantize_s=r["quantize_s"])
                else:
                    rows.append(row)
            del runner
    os.environ["LLMPARETO_CACHE"] = root
    return pd.DataFrame(rows)


def front_table(out: str, quantizer: str, trials: int, evals: int, calib: int,
                granularity: str) -> tuple[pd.DataFrame, Path]:
    import llmpareto

    study = f"quantizers-{quantizer}-{granularity}-{time.strftime('%H%M%S')}"
    llmpareto.search(quantizer=quantizer, calib_tokens=calib, eval_tokens=evals, trials=trials,
                     granularity=granularity, study=study, runs_dir=out, progress=False)
    run = Path(out) / study
    t = pd.read_csv(run / "trials.csv")
    t = t[(t["state"] == "COMPLETE") & t["feasible"]]
    rows = []
    searched = t[~t["baseline"].fillna("").str.startswith("llama.cpp")]
    for _, p in t[t["baseline"].fillna("").str.startswith("llama.cpp")].iterrows():
        ok = searched[searched["weights_bytes"] <= p["weights_bytes"]]
        best = ok.loc[ok["perplexity"].idxmin()] if len(ok) else None
        rows.append({"preset": p["baseline"], "preset_bytes": int(p["weights_bytes"]),
                     "preset_perplexity": p["perplexity"],
                     "front_trial": None if best is None else int(best["trial"]),
                     "front_label": "" if best is None else (best["baseline"] or "searched"),
                     "front_bytes": None if best is None else int(best["weights_bytes"]),
                     "front_perplexity": None if best is None else best["perplexity"],
                     "gain": None if best is None else 1 - best["perplexity"] / p["perplexity"]})
    return pd.DataFrame(rows), run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--quantizer", default=None, help="for (c); default: the best in (b)")
    ap.add_argument("--granularity", default="type")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="abc")
    a = ap.parse_args(argv)
    out = a.out or tempfile.mkdtemp(prefix="bench-quantizers-")
    # a fresh variant cache, so first-run times are real
    os.environ["LLMPARETO_CACHE"] = str(Path(out) / "cache")
    evals, calib, trials = (1024, CALIB, 24) if a.quick else (a.eval_tokens, CALIB, a.trials)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    best = a.quantizer
    if "a" in a.parts:
        print("(a) llama.cpp presets, rtn vs imatrix")
        print(presets_table(evals, calib).round(4).to_string(index=False), flush=True)
    if "b" in a.parts:
        print("\n(b) uniform formats by quantizer")
        ub = uniform_table(evals, calib)
        print(ub.round(4).to_string(index=False), flush=True)
        if best is None:  # lowest geometric-mean perplexity over the three formats
            best = ub.groupby("quantizer")["perplexity"].apply(
                lambda s: float(np.exp(np.log(s).mean()))).idxmin()
    if "c" in a.parts:
        best = best or "imatrix"
        print(f"\n(c) formats search ({best}, {a.granularity}, {trials} trials) vs presets")
        table, run = front_table(out, best, trials, min(evals, 2048), calib, a.granularity)
        print(table.round(4).to_string(index=False))
        print(f"run: {run}")


if __name__ == "__main__":
    main()
