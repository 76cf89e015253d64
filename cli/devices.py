"""`llmpareto devices`, `llmpareto cost` and `llmpareto profile-host`: the device verbs."""

from __future__ import annotations

import argparse
import json

import pandas as pd

from llmpareto.errors import UserError


def cmd_devices(args: argparse.Namespace) -> int:
    from llmpareto.device_profiles import list_profiles, load_profile

    if (args.refit or args.out) and not args.name:
        raise UserError("--refit/--out need a profile: llmpareto devices NAME --refit token "
                        "[--out FILE]")
    if args.out and not args.refit:
        raise UserError("--out writes the re-fitted profile: add --refit token|layer")
    if args.name:
        p = load_profile(args.name)
        if args.refit:
            return _refit(p, args)
        d = p.to_dict()
        if args.json:
            print(json.dumps(d, indent=2))
            return 0
        print(f"{p.name}: {p.description}\nruntime: {p.runtime}\nfile: {p.path}\n")
        for key, value in d.items():
            if key in ("name", "description", "runtime", "sources", "measurements"):
                continue
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                field = f"{key}.{sub}" if sub else key
                print(f"{field:<22} {v!s:<28} {p.sources.get(field, '')}")
        _print_check(p)
        return 0
    rows = []
    for name in list_profiles():
        p = load_profile(name)
        rows.append({"device": name, "memory_GB": p.memory_bytes / 1e9,
                     "bandwidth_GBps": p.bandwidth_Bps / 1e9, "eta_mem": p.eta_mem,
                     "f16_TFLOPs": p.peak("f16") / 1e12, "power_active_w": p.power_active_w,
                     "runtime": p.runtime[:40]})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\n`llmpareto devices NAME` shows every field with its source; `--device host` "
          "measures this machine.")
    return 0


def _refit(p, args: argparse.Namespace) -> int:
    """Re-fit eta_mem and the overhead on the profile's fit rows; print before and after."""
    from llmpareto.device_profiles import dump_toml
    from llmpareto.evaluators.profile_check import check_rows, refit, summary

    try:
        new = refit(p, args.refit)
    except ValueError as exc:
        raise UserError(f"--refit {p.name}: {exc}; add [[measurements]] rows with role = "
                        f"\"fit\" (published decode speeds of 2+ model sizes) to its .toml")\
            from None
    for label, prof in (("before", p), ("after", new)):
        s = summary(check_rows(prof))
        print(f"{label}: eta_mem {prof.eta_mem:.4g}, overhead_s_per_token "
              f"{prof.overhead_s_per_token:.4g}, overhead_s_per_layer "
              f"{prof.overhead_s_per_layer:.4g}; " + "; ".join(
                  f"{role} {v['rows']} rows MAPE {v['mape_%']:.1f}%" for role, v in s.items()))
    if args.out:
        from llmpareto import atomic

        atomic.write_text(args.out, dump_toml(new))
        print(f"wrote {args.out}")
    else:
        _print_check(new)
    return 0


def _print_check(p) -> None:
    """Predicted vs measured decode of the profile's [[measurements]], fit and held-out apart."""
    from llmpareto.evaluators.profile_check import check_rows, summary

    if not p.measurements:
        print("\nno [[measurements]]: nothing to check this profile's predictions against")
        return
    rows = check_rows(p)
    sources = list(dict.fromkeys(r["source"] for r in rows))
    df = pd.DataFrame(rows)
    df["source"] = [sources.index(s) for s in df["source"]]
    print(f"\npredicted vs measured decode ({len(rows)} measurements; tgN = mean of KV 0..N):")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for role, s in summary(rows).items():
        print(f"{role}: {s['rows']} rows, MAPE {s['mape_%']:.1f}%, Spearman {s['spearman']:.3f}")
    print("sources:")
    for i, src in enumerate(sources):
        print(f"  [{i}] {src}")


def _gpu_profile(args: argparse.Namespace):
    """llama.cpp with every block on this machine's GPU, calibrated into the GPU's profile."""
    from llmpareto.device_profiles import load_profile
    from llmpareto.evaluators.host_llamacpp import calibrate_llamacpp_gpu

    if not (args.gpu and args.base):
        raise UserError("--gpu needs --base PROFILE (the GPU's own profile: a shipped name such "
                        "as h100-sxm, or your .toml with its bandwidth, memory, peaks and power),"
                        " and --base is for --gpu")
    if args.runtime != "llamacpp" or args.like or args.threads is not None or args.quick:
        raise UserError("--gpu calibrates llama.cpp: use it with --runtime llamacpp, without "
                        "--like, --threads or --quick")
    return calibrate_llamacpp_gpu(load_profile(args.base))


def cmd_profile_host(args: argparse.Namespace) -> int:
    from llmpareto.device_profiles import dump_toml
    from llmpareto.evaluators.host import measure_host_profile

    if args.threads is not None and args.runtime != "llamacpp":
        raise UserError("--threads is for --runtime llamacpp; torch's threads are set by "
                        "OMP_NUM_THREADS / torch.set_num_threads")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: give 1 or more llama.cpp threads")
    if args.like and args.runtime != "llamacpp":
        raise UserError("--like is for --runtime llamacpp (it adds calibration models shaped "
                        "like that model)")
    if args.gpu or args.base:
        profile = _gpu_profile(args)
    else:
        like = None
        if args.like:
            from llmpareto.models import load_arch

            like = load_arch(args.like)
        profile = measure_host_profile(runtime=args.runtime, quick=args.quick,
                                       threads=args.threads, like=like)
    text = dump_toml(profile)
    if args.out:
        from llmpareto import atomic

        atomic.write_text(args.out, text)
        print(f"wrote {args.out}: bandwidth {profile.bandwidth_Bps / 1e9:.1f} GB/s, eta_mem "
              f"{profile.eta_mem:.2f}, f32 peak {profile.peak('f32') / 1e9:.0f} GFLOP/s")
    else:
        print(text)
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from llmpareto.api import cost

    rep = cost(model=args.model, device=args.device, recipe=args.recipe, format=args.format,
               context=args.context, prompt_tokens=args.prompt_tokens, batch=args.batch)
    if args.json:
        print(json.dumps({k: rep[k] for k in ("model", "device", "workload", "totals",
                                              "breakdown")}, indent=2))
        return 0
    w, totals = rep["workload"], rep["totals"]
    print(f"{args.model} on {rep['device']} ({rep['runtime']}); context {w['context']}, prompt "
          f"{w['prompt_tokens']}, batch {w['batch']}\n")
    df = pd.DataFrame(rep["breakdown"])
    df["bytes"] /= 1e6
    df["flops"] /= 1e9
    df = df.rename(columns={"bytes": "MB", "flops": "GFLOP"})
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\ndecode: {totals['latency_ms']:.3g} ms/token = {totals['decode_tokens_per_s']:.3g} "
          f"tokens/s, {totals['energy_mj']:.3g} mJ/token; prefill {totals['prefill_ms']:.4g} ms")
    print(f"memory: {totals['memory_bytes']:.0f} bytes (weights {totals['weights_bytes']:.0f}, KV "
          f"{totals['kv_cache_bytes']:.0f}, activations {totals['activation_bytes']:.0f}); fits "
          f"{rep['memory_limit_bytes']} bytes: {'yes' if totals['fits_memory'] else 'NO'}")
    return 0


def add_device_commands(sub) -> None:
    pd_ = sub.add_parser("devices", help="list device profiles, or show one with its sources")
    pd_.add_argument("name", nargs="?", help="profile name or .toml path")
    pd_.add_argument("--json", action="store_true")
    pd_.add_argument("--refit", choices=("token", "layer"), help="re-fit eta_mem and a fixed "
                     "cost per token (or per block) on the profile's [[measurements]] fit rows")
    pd_.add_argument("--out", help="--refit: write the re-fitted profile here (TOML)")
    pd_.set_defaults(func=cmd_devices)
    ph = sub.add_parser("profile-host", help="measure this machine and write a device profile")
    ph.add_argument("--out", help="TOML file to write (default: print)")
    ph.add_argument("--quick", action="store_true", help="smaller, faster measurements")
    ph.add_argument("--runtime", choices=("torch", "llamacpp"), default="torch",
                    help="whose efficiencies to measure: torch (transformers eager, what the "
                         "search runs) or llamacpp (calibrated on random GGUF models)")
    ph.add_argument("--threads", type=int, help="--runtime llamacpp: threads to calibrate "
                    "with, as the deployment will run (default: all CPUs)")
    ph.add_argument("--like", metavar="MODEL", help="--runtime llamacpp: also calibrate on "
                    "random models with MODEL's block shapes (a --model value)")
    ph.add_argument("--gpu", action="store_true", help="--runtime llamacpp: calibrate llama.cpp "
                    "(a CUDA build) with every block on this machine's GPU")
    ph.add_argument("--base", metavar="PROFILE", help="--gpu: the GPU's profile whose runtime "
                    "numbers are calibrated (e.g. h100-sxm, or your .toml)")
    ph.set_defaults(func=cmd_profile_host)
    pc = sub.add_parser("cost", help="per-layer-kind bytes, FLOPs, time and energy on a device")
    pc.add_argument("--model", default="smollm2-135m",
                    help="as in search, or a folder holding only config.json")
    pc.add_argument("--device", default="raspberry-pi-5")
    pc.add_argument("--recipe", help="recipe JSON (e.g. runs/<study>/recipes/<n>.json)")
    pc.add_argument("--format", help="uniform weight format (default f16)")
    pc.add_argument("--context", type=int, default=2048)
    pc.add_argument("--prompt-tokens", type=int, default=128)
    pc.add_argument("--batch", type=int, default=1)
    pc.add_argument("--json", action="store_true")
    pc.set_defaults(func=cmd_cost)
