"""Benchmark of trials on each torch device (issue 14): the same script on the CPU and a GPU.

(a) per device (cpu, and cuda:0 where torch sees one), the default model: time per trial / one
    plain forward pass over the same evaluation tokens (aim <= 1.10), trials per minute, peak
    device and host memory, preparation time;
(b) GPU trials per minute against the CPU's (when both ran);
(c) --shapes 1b,8b: Llama-3.2-1B- and Llama-3.1-8B-shaped models with RANDOM weights, written
    as bfloat16 safetensors and loaded through the product's loader (speed and memory only:
    their perplexities mean nothing): load time, preparation time (--shape-formats, by default
    the 7 GGUF formats), time per trial, peak device and host memory.

Each measurement runs in its own process, so one's peak memory never shows in another's.
Run: python -m llmpareto.bench.bench_devices [--devices cpu,cuda] [--trials 12]
     [--shapes 1b,8b] [--shape-eval-tokens 512] [--out bench-devices]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Llama-3.2-1B and Llama-3.1-8B (their config.json): shapes only, the weights are random
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "tie_word_embeddings": False},
}


def random_model_folder(shape: str, folder: Path) -> Path:
    """A random-weight model of `shape` as bfloat16 safetensors (made once, kept in `folder`),
    with the tiny BPE tokenizer (ids < 1024: the text only needs to be tokenized)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpareto.tiny import build_tiny_model

    out = folder / f"random-{shape}"
    if (out / "config.json").is_file():
        return out
    build_tiny_model(folder / "tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    for f in (folder / "tokenizer").iterdir():
        if "token" in f.name:
            (out / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1,
                      eos_token_id=2, dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of 8B weights
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def measure(model: str, device: str, trials: int, eval_tokens: int, formats: str | None,
            runs_dir: str) -> dict:
    """One process: load, prepare, then plain forward passes and random trials."""
    import optuna
    import torch

    from llmpareto.evaluators.quality import window_nll
    from llmpareto.placement import peak_device_bytes
    from llmpareto.recipe import Recipe
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.session import peak_rss_bytes
    from llmpareto.search.settings import SearchSettings

    threads = torch.get_num_threads()
    s = SearchSettings(model=model, torch_device=device, eval_tokens=eval_tokens,
                       formats=formats, presets="none", device="h100-sxm", progress=False,
                       runs_dir=runs_dir, study="bench", variant_cache=200 * 10**9)
    t0 = time.perf_counter()
    runner = TrialRunner(s)
    load_s, rss_load = time.perf_counter() - t0, peak_rss_bytes()
    t0 = time.perf_counter()
    runner.prepare()
    prepare_s = time.perf_counter() - t0
    from llmpareto.compress import apply

    apply(runner.model, Recipe({}), runner.cache)
    ev = runner.windows.eval
    window_nll(runner.model, ev, s.batch_size)  # warm-up
    forward = []
    for _ in range(3):
        t0 = time.perf_counter()
        window_nll(runner.model, ev, s.batch_size)
        forward.append(time.perf_counter() - t0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    times = []
    t_all = time.perf_counter()
    while len(times) < trials:
        recipe = runner.space.suggest(study.ask())
        t0 = time.perf_counter()
        result = runner.run(recipe)
        if not result.reused and result.feasible:
            times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    trial = statistics.median(times[1:] if len(times) > 2 else times)
    return {"model": model, "placement": runner.placement.to_dict(), "threads": threads,
            "params": runner.arch.n_params, "eval_tokens": int(ev.size), "load_s": load_s,
            "prepare_s": prepare_s, "forward_s": statistics.median(forward),
            "trial_s": trial, "ratio": trial / statistics.median(forward),
            "trials_per_min": 60 * len(times) / wall, "packed_bytes": runner.cache.nbytes,
            "packed_on_device_bytes": runner.cache.device_nbytes,
            "peak_host_after_load_bytes": rss_load, "peak_host_bytes": peak_rss_bytes(),
            "peak_device_bytes": peak_device_bytes(runner.placement)}


def _in_process(args: list[str]) -> dict:
    """Run `measure` in a fresh Python, so peak memory is this measurement's alone."""
    proc = subprocess.run([sys.executable, "-m", "llmpareto.bench.bench_devices", "--one",
                           *args], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(v) -> str:
    return "-" if v is None else f"{v / 1e9:.2f} GB"


def report(r: dict, label: str) -> None:
    if "error" in r:
        print(f"{label}: failed: {r['error']}")
        return
    p = r["placement"]
    print(f"{label} on {p['device']} ({p['dtype']}, {r['threads']} threads), {r['params'] / 1e9:.2f}"
          f"B params, {r['eval_tokens']} eval tokens: load {r['load_s']:.1f} s, preparation "
          f"{r['prepare_s']:.1f} s ({_gb(r['packed_bytes'])} packed, {_gb(r['packed_on_device_bytes'])}"
          f" of it on the device)")
    print(f"  median trial {r['trial_s']:.3f} s / plain forward {r['forward_s']:.3f} s = "
          f"{r['ratio']:.3f} (aim <= 1.10); {r['trials_per_min']:.1f} trials/min")
    print(f"  peak host RSS {_gb(r['peak_host_after_load_bytes'])} after load, "
          f"{_gb(r['peak_host_bytes'])} at the end; peak device {_gb(r['peak_device_bytes'])}")


def main() -> None:
    from llmpareto.placement import cuda_count

    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default=None,
                    help="default: cpu, and cuda when present; none: only the --shapes rows")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--shapes", default="", help="1b, 8b or 1b,8b (random weights)")
    ap.add_argument("--shape-devices", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--shape-eval-tokens", type=int, default=512)
    ap.add_argument("--shape-trials", type=int, default=6)
    ap.add_argument("--shape-formats", default="f16,q8_0,q5_1,q5_0,q4_1,q4_0,tq2_0")
    ap.add_argument("--out", default="bench-devices")
    ap.add_argument("--one", nargs=5, metavar=("MODEL", "DEVICE", "TRIALS", "TOKENS", "FORMATS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        model, device, n, tokens, formats = args.one
        print(json.dumps(measure(model, device, int(n), int(tokens),
                                 None if formats == "default" else formats,
                                 str(Path(args.out) / f"runs-{device}-{time.time_ns()}"))))
        return
    gpu = cuda_count() > 0
    devices = [d for d in (args.devices or ("cpu,cuda" if gpu else "cpu")).split(",")
               if d != "none"]  # none: only the --shapes rows
    if not gpu:
        print("no CUDA GPU here: the GPU rows are not measured (run this script on one)")
    runs = {}
    for dev in devices:
        runs[dev] = _in_process(["smollm2-135m", dev, str(args.trials), str(args.eval_tokens),
                                 "default"])
        report(runs[dev], "(a) smollm2-135m, default formats,")
    if "error" not in runs.get("cpu", {"error": 1}) and "error" not in runs.get("cuda",
                                                                                {"error": 1}):
        print(f"(b) trials per minute, GPU / CPU: {runs['cuda']['trials_per_min']:.1f} / "
              f"{runs['cpu']['trials_per_min']:.1f} = "
              f"{runs['cuda']['trials_per_min'] / runs['cpu']['trials_per_min']:.1f}x")
    for shape in [s for s in args.shapes.split(",") if s]:
        folder = random_model_folder(shape, Path(args.out))
        for dev in (args.shape_devices or ("cuda" if gpu else "cpu")).split(","):
            r = _in_process([str(folder), dev, str(args.shape_trials),
                             str(args.shape_eval_tokens), args.shape_formats])
            runs[f"{shape}-{dev}"] = r
            report(r, f"(c) random {shape} (Llama shape, random bf16 weights), "
                      f"{len(args.shape_formats.split(','))} formats,")
    Path(args.out).mkdir(exist_ok=True)
    (Path(args.out) / "bench_devices.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
