"""Command line: `llmpareto search ...`; flags map one to one onto llmpareto.search(...)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from llmpareto.errors import UserError
from llmpareto.search.settings import SearchSettings

_HELP = {
    "model": "smollm2-135m (embedded default), a HF directory, a .gguf file, or a cached hub id",
    "allow_pickle": "allow loading pickle checkpoints (they can run code)",
    "text": "text file(s) for calibration and evaluation (default: CPython docs)",
    "window": "tokens per window", "calib_tokens": "calibration tokens (for kl_nats)",
    "eval_tokens": "evaluation tokens (for perplexity and kl_nats)",
    "eval_text": "a text of another domain than --text, never calibrated or trained on: the "
                 "front is measured on it after the trials (default: the shipped "
                 "python-license; none to skip)",
    "eval_text_tokens": "tokens of --eval-text measured",
    "recover_steps": "recover the front after the trials with this many steps in the first "
                     "round (0: off; docs/recovery.md)",
    "recover_rounds": "successive-halving rounds of recovery (round r: steps * 2**r, the "
                      "better half, from the weights round r-1 kept)",
    "recover_tokens": "calibration tokens recovery learns on",
    "recover_method": "auto (block-wise reconstruction for quantized points, then "
                      "quantization-aware training in later rounds; end-to-end "
                      "distillation for students and pruned ones) | reconstruct | refit "
                      "(students: least-squares, seconds; fits the calibration domain) | "
                      "local (blockwise local distillation) | distill | qat",
    "recover_guard": "with --recover-steps: a text of a third domain (neither --text nor "
                     "--eval-text) nothing learns on; a point keeps recovered weights only "
                     "when they are also no further from the base model on it (default: the "
                     "shipped python-source, Python code; none: held-out calibration windows "
                     "alone decide)",
    "recover_here": "with --storage: this process recovers points too (--no-recover-here: it "
                    "only hands them to the study's workers, e.g. from a machine without "
                    "the GPU)",
    "space": "search space: formats, sparsity, students, or a join such as formats,sparsity "
             "or formats,sparsity,students (cut to the student, prune, then quantize). "
             "sparsity: llama.cpp runs it no faster or smaller (it has no sparse kernels; "
             "only the PyTorch 2:4 kernels of the h100-sxm and rtx-4090 profiles, for the "
             "compressed-tensors export, do); for AMC-style structure llama.cpp runs faster "
             "use students with --student-granularity block",
    "student_blocks": "--space ...students: numbers of blocks kept, e.g. 30,27,24",
    "student_mlp_ratios": "--space ...students: MLP widths kept, e.g. 1,0.75,0.5",
    "student_heads": "--space ...students: KV heads kept per block (whole groups), e.g. 3,2",
    "student_granularity": "--space ...students: model (one MLP width and KV-group count for "
                           "every block) | block (one per kept block: llama.cpp runs each "
                           "block at its own size, docs/students-and-distillation.md)",
    "formats": "comma-separated weight formats to choose from",
    "sparsity_method": "--space ...sparsity: magnitude | wanda | sparsegpt",
    "sparsity_pattern": "--space ...sparsity: unstructured (levels) or N:M, e.g. 2:4",
    "sparsity_levels": "--space ...sparsity: comma-separated unstructured levels in [0, 1)",
    "granularity": "module | block | type (one format per projection kind)",
    "quantizer": "rtn | imatrix | gptq: how each format is made (docs/formats-and-quantizers.md)",
    "imatrix": "on (from the calibration text) | off | FILE (a llama.cpp imatrix .dat/.gguf)",
    "gptq_damp": "--quantizer gptq: damping as a fraction of the mean diagonal of x^T x",
    "gptq_act_order": "--quantizer gptq: quantize columns by descending activation energy",
    "presets": "llama.cpp presets enqueued as baselines (comma list of Q2_K, Q3_K_S, Q3_K_M, "
               "Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, Q8_0; default all), or none",
    "disk_cache": "folder for calibrated variants kept between runs (default "
                  "$LLMPARETO_CACHE or ~/.cache/llmpareto), or off",
    "objectives": "comma-separated metrics to minimize: perplexity, kl (kl_nats), memory_bytes",
    "max_memory": "memory budget: bytes or 120MB, 0.5GB, 300MiB",
    "context": "context tokens: KV cache held in memory and read by each decoded token",
    "device": "target device: a shipped profile (llmpareto devices), a .toml path, or host",
    "max_latency_ms": "budget: predicted decode ms per token on --device",
    "max_energy_mj": "budget: predicted mJ per decoded token on --device",
    "prompt_tokens": "prompt length for prefill_ms and activation buffers",
    "strategy": "nsga2 | tpe | random | knapsack | evolve | auto (docs/strategies.md; "
                "default auto)",
    "sampler": "the old name of --strategy (nsga2 | tpe | random)",
    "sweep": "--strategy knapsack/evolve: budgets seeded by the knapsack (default: by strategy)",
    "repair": "lower a proposal over the budget on its least sensitive choices (HAQ-style)",
    "sensitivity": "a sensitivity.json to reuse (same model, text and space); default: measure",
    "sensitivity_tokens": "calibration tokens each sensitivity KL is measured on",
    "population": "NSGA-II population size",
    "trials": "completed trials wanted, baselines included (uniform recipes and llama.cpp's "
              "presets: the first ~20 of a formats run, more with students and sparsity)",
    "study": "study name: the run goes to RUNS_DIR/STUDY", "runs_dir": "where runs are written",
    "resume": "continue an interrupted or finished study", "seed": "random seed",
    "batch_size": "windows per forward pass",
    "dequant_cache": "memory for dequantized variants kept between trials (LRU), e.g. 4GB",
    "variant_cache": "memory for packed codes and pruned weights (LRU; dropped ones are made "
                     "again), e.g. 4GB",
    "baselines": "enqueue uniform recipes first",
    "country": "ISO country code for the CO2 estimate", "progress": "show a progress bar",
    "address": "--backend ray: Ray cluster address, auto or HOST:PORT (default: start Ray here)",
    "cpus_per_trial": "--backend ray: CPUs per trial (also torch threads)",
    "gpus_per_trial": "--backend ray: GPUs per trial (e.g. 1, or 0.5: two trials share one); "
                      "trials then run on CUDA",
    "torch_device": "where trials run: auto (CUDA when present), cpu, cuda, cuda:N",
    "torch_dtype": "dtype of the model in trials: auto (float32 on CPU, bfloat16 on CUDA), "
                   "float32, bfloat16, float16",
    "max_concurrent": "--backend ray: trials running at once (default: as CPUs allow)",
    "storage": "SQLAlchemy URL (postgresql://user:pw@host/db) of a study that `llmpareto worker`"
               " processes share",
    "create_only": "with --storage: create the study and return; workers run the trials",
}


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    defaults = SearchSettings.__dataclass_fields__
    for f in fields(SearchSettings):
        if f.name == "version":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults[f.name].default
        if f.type in ("bool",) or isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=_HELP.get(f.name))
        elif f.name == "text":
            p.add_argument(flag, nargs="+", default=None, metavar="FILE", help=_HELP[f.name])
        elif f.name in ("window", "calib_tokens", "eval_tokens", "context", "trials", "seed",
                        "batch_size", "population", "prompt_tokens", "max_concurrent", "sweep",
                        "sensitivity_tokens", "eval_text_tokens", "recover_steps",
                        "recover_rounds", "recover_tokens"):
            p.add_argument(flag, type=int, default=default,
                           help=_HELP.get(f.name))
        elif f.name in ("cpus_per_trial", "gptq_damp", "gpus_per_trial"):
            p.add_argument(flag, type=float, default=default, help=_HELP[f.name])
        else:
            p.add_argument(flag, default=None if f.name in ("objectives",) else default,
                           help=_HELP.get(f.name))


def _cmd_search(args: argparse.Namespace) -> int:
    from llmpareto.api import search
    from llmpareto.cli.front import print_front

    kwargs = {f.name: getattr(args, f.name) for f in fields(SearchSettings)
              if f.name != "version" and hasattr(args, f.name)}
    if kwargs.get("objectives") is None:
        kwargs.pop("objectives")
    front = search(backend=args.backend, **kwargs)
    print(f"\nPareto front ({len(front)} points, objectives: {', '.join(front.objectives)}):")
    print_front(front, args.show_all)
    print(f"\nrun directory: {front.run_dir}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from llmpareto.api import worker

    done = worker(args.study, args.storage, args.runs_dir, torch_device=args.torch_device,
                  progress=args.progress)
    print(f"worker finished: {done} trials run here; run directory: "
          f"{args.runs_dir}/{args.study}")
    return 0


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        from llmpareto.versions import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpareto", description=__doc__)
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the versions of llmpareto and of the packages a run uses")
    sub = parser.add_subparsers(dest="command", required=True)
    ps = sub.add_parser("search", help="search compressed variants and print the Pareto front")
    ps.add_argument("--backend", default="local",
                    help="local (Optuna; SQLite, or --storage URL) | ray (Ray Tune, --address)")
    _add_settings_flags(ps)
    ps.add_argument("--show-all", action="store_true", help="print every front point; by "
                    "default points with perplexity above 2x the base model's (uniform f16) are "
                    "left out of the printed front (trials.csv and front.csv keep them)")
    ps.set_defaults(func=_cmd_search)
    pw = sub.add_parser("worker", help="run trials of a study shared through --storage")
    pw.add_argument("--study", required=True, help="study name (made by search --storage)")
    pw.add_argument("--storage", required=True, help="SQLAlchemy URL of the shared study")
    pw.add_argument("--runs-dir", default="runs", help="where this worker writes the run")
    pw.add_argument("--torch-device", default=None,
                    help="this worker's device, e.g. cuda:1 (default: the study's, auto)")
    pw.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="show a progress bar")
    pw.set_defaults(func=_cmd_worker)
    from llmpareto.cli.devices import add_device_commands
    from llmpareto.cli.doctor import add_doctor_command
    from llmpareto.cli.front import add_front_commands
    from llmpareto.cli.sensitivity import add_sensitivity_command

    add_device_commands(sub)
    add_doctor_command(sub)
    add_front_commands(sub)
    add_sensitivity_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"llmpareto: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmpareto: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmpareto devices X | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
