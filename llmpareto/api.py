"""Public Python API: one function per command, each keyword argument named as its flag
(dashes -> underscores). The command line (cli/) only parses flags and prints what these return.

    import llmpareto
    front = llmpareto.search(max_memory="120MB", device="raspberry-pi-5", study="demo")
    llmpareto.pick("runs/demo", out="out/", best="perplexity")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from llmpareto.front import Front


def search(backend: str = "local", **kwargs: Any) -> Front:
    """`llmpareto search`: run (or `resume=True`) a search and return its Pareto front (every
    point; `Front.deployable()` is what the command prints).

    Example: `llmpareto.search(max_memory="120MB", trials=40, study="demo")`.
    See `SearchSettings` for every option and its default.
    """
    from llmpareto.search import run_search

    return run_search(backend, **kwargs)


def load_front(run: str | Path, where: str | None = None, sort: str | None = None,
               measure: bool = False, threads: int | None = None, rebuild: bool = False,
               storage: str | None = None) -> Front:
    """`llmpareto front RUN`: the run's front, `rebuild` first rewritten from its study (a
    shared one at `storage`), filtered by `where`, sorted by `sort`, and with `measure`
    each point exported to GGUF and measured in llama.cpp on this host (measured_* columns)."""
    from llmpareto.errors import UserError
    from llmpareto.query import where as where_rows

    run = Path(run)
    if storage and not rebuild:
        raise UserError("--storage is for --rebuild (the shared study to rebuild from)")
    if rebuild:
        from llmpareto.search.rebuild import rebuild as rebuild_run

        rebuild_run(run, storage)
    front = Front.load(run)
    df = where_rows(front.df, where)
    if sort:
        if sort not in df.columns:
            raise UserError(f"--sort {sort!r}: unknown column; columns: "
                            f"{', '.join(c for c in df.columns if not c.startswith('param:'))}")
        df = df.sort_values(sort)
    if measure:
        from llmpareto.export.measure import measure_front

        df = measure_front(run, df, threads)
    return Front(df, front.objectives, front.trials, front.run_dir)


def pick(run: str | Path, out: str | Path, trial: int | None = None, best: str | None = None,
         where: str | None = None, format: str = "gguf,hf", force: bool = False,
         distilled: bool = False, recovered: bool = True) -> Path:
    """`llmpareto pick RUN --out OUT`: export one front point (by `trial`, or the one `best` in
    a metric among those matching `where`) as GGUF and/or HF safetensors, with the weights
    the search's recovery learned for it when it has them (unless not `recovered`); returns
    `out`."""
    from llmpareto.errors import UserError
    from llmpareto.export.pick import pick as pick_point

    if trial is None and best is None:
        raise UserError("say which point: --trial N, or --best METRIC [--where EXPR]")
    return pick_point(run, out, trial=trial, best=best, where_expr=where, formats=format,
                      force=force, distilled=distilled, recovered=recovered)


def distill(run: str | Path, steps: int, trial: int | None = None, front: bool = False,
            rounds: int = 2, lr: float = 1e-4, batch_size: int = 4, seq_len: int | None = None,
            temperature: float = 2.0, alpha: float = 0.5, qat: bool = False,
            checkpoint_every: int = 50, progress: bool = True) -> dict | pd.DataFrame:
    """`llmpareto distill RUN`: recover one `trial` (a dict: steps, losses, s/step,
    distilled_perplexity) or, with `front=True`, every front point by successive halving over
    `rounds` (a table). Recorded in the run's trials.csv and front.csv."""
    from llmpareto.errors import UserError
    from llmpareto.search.distill_run import distill_front, distill_trial

    if (trial is None) == (not front):
        raise UserError("say what to distill: --trial N or --front (one of them)")
    kw = {"lr": lr, "batch_size": batch_size, "seq_len": seq_len, "temperature": temperature,
          "alpha": alpha, "qat": qat, "checkpoint_every": checkpoint_every, "progress": progress}
    if front:
        return distill_front(run, steps, rounds, **kw)
    return distill_trial(run, trial, steps, **kw)


def cost(model: str = "smollm2-135m", device: str = "raspberry-pi-5", recipe: str | None = None,
         format: str | None = None, context: int = 2048, prompt_tokens: int = 128,
         batch: int = 1) -> dict:
    """`llmpareto cost`: predicted latency, energy and memory of one recipe (a recipe JSON, or
    a uniform `format`) of `model` on `device`, with the per-layer-kind breakdown. No torch."""
    from llmpareto.evaluators.cost import cost_report

    return cost_report(model=model, device=device, recipe=recipe, format=format,
                       context=context, prompt_tokens=prompt_tokens, batch=batch)


def worker(study: str, storage: str, runs_dir: str = "runs", torch_device: str | None = None,
           progress: bool = True) -> int:
    """`llmpareto worker`: join a study shared through `storage` (made by
    `search(storage=..., create_only=True)`) and run its trials; returns how many ran here."""
    from llmpareto.search.rdb import run_worker

    return run_worker(study, storage, runs_dir, progress=progress, torch_device=torch_device)
