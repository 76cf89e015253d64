"""GPU profile benchmark (run it on the GPU): calibrate llama.cpp with every block offloaded,
then compare the calibrated profile's predicted decode with measured decode of held-out
models and of exported front points, next to the shipped profile's predictions.

    python3 -m llmpareto.bench.bench_gpu_profile --base h100-sxm --recipes runs/x/front-recipes

Needs llama-cpp-python built with CUDA (CMAKE_ARGS="-DGGML_CUDA=on"). Held-out models are
the public shapes in `llmpareto.shapes` (Llama-2-7B, TinyLlama-1.1B, Llama-3.2-1B,
Qwen2.5-0.5B, SmolLM2-135M) in every GPU format; front points are recipes of a search on the
default model (their JSON files in --recipes), written in SmolLM2-135M's shape. All files are
timing GGUFs (llama.cpp's speed depends on shapes and formats, not on weight values): the
real model file is not needed on the GPU machine.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTEXT = 256  # KV length decode is timed and predicted at
HELD_OUT = ("smollm2-135m", "qwen2.5-0.5b", "tinyllama-1.1b", "llama-3.2-1b", "llama-2-7b")


def _predict(arch, formats, profile) -> float:
    from llmpareto.budget import Workload
    from llmpareto.evaluators.cost import op_costs, summarize

    w = Workload(prompt_tokens=128, context=CONTEXT)
    return summarize(op_costs(arch, formats, profile, w), arch, profile, w)["latency_ms"]


def _cases(recipes: Path | None, models=HELD_OUT):
    """(group, label, shape, formats) of every file to time."""
    from llmpareto.evaluators.host_llamacpp import GPU_FORMATS
    from llmpareto.recipe import Recipe
    from llmpareto.shapes import known_shape

    shape = known_shape("smollm2-135m")
    for path in sorted((recipes or Path("/nonexistent")).glob("*.json"),
                       key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
        yield "front point", f"trial {path.stem}", shape, \
            shape.arch().formats_for(Recipe.load(path))
    for name in [m for m in models if m]:  # smallest first: the 7B files take longest to write and load
        shape = known_shape(name)
        for fmt in GPU_FORMATS:
            yield "held-out model", f"{name} {fmt}", shape, \
                shape.arch().formats_for(Recipe.uniform(fmt))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="h100-sxm", help="the GPU's shipped profile (or .toml)")
    ap.add_argument("--recipes", type=Path, help="folder of front-point recipe JSON files")
    ap.add_argument("--out", type=Path, default=Path("."), help="where the TOML and CSV go")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", help="a calibrated profile TOML: skip the calibration")
    ap.add_argument("--models", default=",".join(HELD_OUT), help="held-out shapes to time")
    ap.add_argument("--report", type=Path, help="only print the summary of this CSV")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    # llama.cpp before numpy, and no pandas in this process: on an H100 host (llama-cpp-python
    # 0.3.36 CUDA build, the image's numpy 2 with scipy-openblas, pandas with pyarrow) numpy
    # loaded first made decode segfault (an OpenMP build), and pandas loaded after llama.cpp
    # aborted ("free(): invalid pointer"). So the summary runs in a child process (--report).
    import llama_cpp  # noqa: F401

    from llmpareto.device_profiles import dump_toml, load_profile
    from llmpareto.evaluators.host_llamacpp import calibrate_llamacpp_gpu
    from llmpareto.evaluators.llamacpp import gguf_speeds
    from llmpareto.evaluators.timing_gguf import write_timing_gguf

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shipped = load_profile(args.base, measure_host=False)
    if args.profile:
        profile = load_profile(args.profile)
    else:
        profile = calibrate_llamacpp_gpu(shipped, rounds=args.rounds)
    toml = args.out / f"{shipped.name}-calibrated.toml"
    toml.write_text(dump_toml(profile))
    print(f"calibrated in {time.perf_counter() - t0:.0f} s -> {toml}: per token "
          f"{1e3 * profile.overhead_s_per_token:.3f} ms, per block "
          f"{1e6 * profile.overhead_s_per_layer:.2f} us, eta_mem {profile.eta_mem:.2f}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for group, label, shape, formats in _cases(args.recipes, args.models.split(",")):
            path = write_timing_gguf(Path(tmp) / "m.gguf", shape, formats)
            m = gguf_speeds([str(path)], contexts=(CONTEXT,), rounds=args.rounds,
                            gpu_layers=-1)[0]
            path.unlink()
            arch = shape.arch()
            no_kernel = sum(1 for f in formats.values() if f and f not in profile.fast_formats)
            rows.append({"group": group, "case": label, "no_gpu_kernel_tensors": no_kernel,
                         "measured_ms": m["measured_latency_ms"],
                         "predicted_ms": _predict(arch, formats, profile),
                         "shipped_predicted_ms": _predict(arch, formats, shipped)})
            _write(rows, args.out / "gpu_predicted_vs_measured.csv")
            print(f"{label}: measured {rows[-1]['measured_ms']:.3f} ms, predicted "
                  f"{rows[-1]['predicted_ms']:.3f}, shipped {rows[-1]['shipped_predicted_ms']:.3f}",
                  flush=True)
    _write(rows, args.out / "gpu_predicted_vs_measured.csv")
    subprocess.run([sys.executable, "-m", __spec__.name, "--report",
                    str(args.out / "gpu_predicted_vs_measured.csv")], check=False)
    print(f"bench wall {time.perf_counter() - t0:.0f} s")


def _write(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def report(path: Path) -> None:
    """The table and, per group, Spearman and MAPE (a process of its own: pandas)."""
    import pandas as pd

    from llmpareto.stats import mape_pct, spearman

    df = pd.read_csv(path)
    df["error_%"] = 100 * (df["predicted_ms"] - df["measured_ms"]) / df["measured_ms"]
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if "no_gpu_kernel_tensors" in df:  # llama.cpp runs those on the CPU: a cost not modelled
        off = df[df["no_gpu_kernel_tensors"] > 0]
        if len(off):
            print(f"left out of the summary: {', '.join(off['case'])} (tensors in a format "
                  "ggml-cuda has no kernel for run on the CPU; the cost model assumes f16)")
        df = df[df["no_gpu_kernel_tensors"] == 0]
    for group, g in df.groupby("group"):
        print(f"{group} ({len(g)} files) at KV {CONTEXT}: calibrated Spearman "
              f"{spearman(g['predicted_ms'], g['measured_ms']):.3f}, MAPE "
              f"{mape_pct(g['predicted_ms'], g['measured_ms']):.1f}%; shipped profile MAPE "
              f"{mape_pct(g['shipped_predicted_ms'], g['measured_ms']):.1f}% (aims: Spearman "
              ">= 0.9, MAPE <= 15%)")


if __name__ == "__main__":
    main()
