"""`llmpareto front` (show, filter, plot, measure a run's front) and `llmpareto pick` (export)."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import pandas as pd

from llmpareto.errors import UserError


def _html(df: pd.DataFrame, png: Path, title: str) -> str:
    img = base64.b64encode(png.read_bytes()).decode()
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body><h1>{title}</h1><img src='data:image/png;base64,{img}'>"
            f"{df.to_html(index=False, float_format=lambda v: f'{v:.4g}')}</body></html>")


def print_front(front, show_all: bool = False, extra: list[str] | tuple[str, ...] = ()) -> None:
    """The front as a table; without `show_all`, points under the quality floor are left out
    and counted (the run's files keep them)."""
    from llmpareto.front import QUALITY_FLOOR

    shown, hidden, limit = (front, 0, None) if show_all else front.deployable()
    print(shown.table(extra=extra))
    if hidden:
        print(f"({hidden} point(s) with perplexity above {limit:.4g}, {QUALITY_FLOOR:g}x the base "
              f"model's, not shown: --show-all prints them; front.csv keeps every point)")


def cmd_front(args: argparse.Namespace) -> int:
    from llmpareto.api import load_front

    run = Path(args.run)
    if args.storage and not args.rebuild:
        raise UserError("--storage is for --rebuild (the shared study to rebuild from)")
    if args.rebuild:
        from llmpareto.search.rebuild import rebuild

        _, written = rebuild(run, args.storage)
        print(f"rebuilt {run} from its study: trials.csv, front.csv, front.json"
              + (", front.png" if (run / "front.png").is_file() else "")
              + (f", {written} recipe file(s)" if written else ""))
    shown = load_front(run, where=args.where, sort=args.sort, measure=args.measure,
                       threads=args.threads)
    df = shown.df
    if args.plot:
        out = Path(args.plot)
        if out.suffix not in (".png", ".html"):
            raise UserError(f"--plot {out}: give a .png or .html file name")
        png = out if out.suffix == ".png" else out.with_suffix(".png")
        shown.plot(png, title=f"{run.name}: Pareto front", show_all=args.show_all)
        if out.suffix == ".html":
            from llmpareto import atomic

            atomic.write_text(out, _html(df.drop(columns=[c for c in df if c.startswith("param:")]),
                                         png, f"{run.name}: Pareto front"))
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(json.dumps(df.replace({float("nan"): None}).to_dict(orient="records"), indent=2))
    else:
        print_front(shown, args.show_all, extra=[c for c in df.columns
                                                 if c.startswith("measured_")])
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    from llmpareto.api import pick

    out = pick(args.run, args.out, trial=args.trial, best=args.best, where=args.where,
               format=args.format, force=args.force, distilled=args.distilled,
               recovered=args.recovered)
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from llmpareto.api import distill

    got = distill(args.run, args.steps, trial=args.trial, front=args.front, rounds=args.rounds,
                  lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                  temperature=args.temperature, alpha=args.alpha, qat=args.qat,
                  checkpoint_every=args.checkpoint_every, progress=args.progress)
    if args.front:
        print(got.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print("recorded in trials.csv and front.csv (distilled_perplexity, distill_steps)")
        return 0
    r = got
    print(f"trial {args.trial}: {r['distill_steps']} steps"
          + (f" (resumed at {r['resumed_from']})" if r["resumed_from"] else "")
          + f", loss {r['first_loss']:.4g} -> {r['last_loss']:.4g}, "
          f"{r['seconds_per_step']:.3f} s/step; distilled_perplexity "
          f"{r['distilled_perplexity']:.4g} (recorded in trials.csv and front.csv)")
    return 0


def add_front_commands(sub) -> None:
    pf = sub.add_parser("front", help="show a run's Pareto front (filter, sort, plot, measure)")
    pf.add_argument("run", help="run directory, e.g. runs/<study>")
    pf.add_argument("--sort", help="column to sort by")
    pf.add_argument("--where", help='filter, e.g. "latency_ms<=20 and memory_bytes<=150e6"')
    pf.add_argument("--format", choices=("table", "csv", "json"), default="table")
    pf.add_argument("--plot", help="write a plot: out.png or out.html")
    pf.add_argument("--measure", action="store_true",
                    help="export each point to GGUF and measure it in llama.cpp on this host")
    pf.add_argument("--threads", type=int, help="llama.cpp threads for --measure")
    pf.add_argument("--rebuild", action="store_true", help="first write trials.csv, front.* "
                    "and missing or damaged recipes again from study.db (the source of truth)")
    pf.add_argument("--show-all", action="store_true", help="also print points under the "
                    "quality floor (perplexity above 2x the base model's); the files keep them")
    pf.add_argument("--storage", help="--rebuild of a run whose study is in a shared database: "
                    "its SQLAlchemy URL")
    pf.set_defaults(func=cmd_front)
    pp = sub.add_parser("pick", help="export one front point (GGUF for llama.cpp, HF safetensors)")
    pp.add_argument("run", help="run directory, e.g. runs/<study>")
    pp.add_argument("--trial", type=int)
    pp.add_argument("--best", help="metric to be best in, e.g. perplexity")
    pp.add_argument("--where", help="with --best: restrict the front first")
    pp.add_argument("--out", required=True, help="output directory")
    pp.add_argument("--format", default="gguf,hf", help="gguf, hf or gguf,hf")
    pp.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    pp.add_argument("--distilled", action="store_true",
                    help="export the weights `llmpareto distill` recovered for this trial")
    pp.add_argument("--recovered", action=argparse.BooleanOptionalAction, default=True,
                    help="export the weights the search's recovery (--recover-steps) learned "
                         "for this point, when it has them (default); --no-recovered: the "
                         "post-training ones")
    pp.set_defaults(func=cmd_pick)
    pd_ = sub.add_parser("distill", help="recover a searched candidate by distillation from the "
                         "base model (checkpointed, resumable)")
    pd_.add_argument("run", help="run directory, e.g. runs/<study>")
    which = pd_.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int)
    which.add_argument("--front", action="store_true",
                       help="every front point, successive halving over --rounds")
    pd_.add_argument("--steps", type=int, required=True,
                     help="optimizer steps (>= 1); with --front, of the first round")
    pd_.add_argument("--rounds", type=int, default=2,
                     help="--front: rounds; each keeps the half that recovered most and "
                          "doubles its steps")
    pd_.add_argument("--lr", type=float, default=1e-4)
    pd_.add_argument("--batch-size", type=int, default=4, help="windows per step")
    pd_.add_argument("--seq-len", type=int, help="tokens per window (default: the run's)")
    pd_.add_argument("--temperature", type=float, default=2.0)
    pd_.add_argument("--alpha", type=float, default=0.5,
                     help="weight of the hard-label loss (1 - alpha: soft targets)")
    pd_.add_argument("--qat", action="store_true",
                     help="apply the recipe's formats in the forward pass (straight-through)")
    pd_.add_argument("--checkpoint-every", type=int, default=50)
    pd_.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    pd_.set_defaults(func=cmd_distill)
