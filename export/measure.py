"""Measuring a run's front in llama.cpp on this host: each point exported to GGUF and run on
the search's own evaluation windows (`llmpareto front RUN --measure`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def measure_front(run_dir: Path, df: pd.DataFrame, threads: int | None = None) -> pd.DataFrame:
    """Export each front point to GGUF (kept under exports/) and measure it in llama.cpp."""
    from llmpareto.evaluators.llamacpp import LlamaCppEvaluator
    from llmpareto.front import Front
    from llmpareto.gguf_write import write_gguf
    from llmpareto.search.workbench import Workbench

    front = Front.load(run_dir)
    rb = Workbench.from_run(run_dir)
    # decode is timed at the run's context, as the predicted latency_ms next to it; perplexity
    # on the search's own evaluation windows (BOS first where the model puts it)
    ev = LlamaCppEvaluator(rb.windows.eval, threads, context=rb.settings.context,
                           prompt_tokens=rb.settings.prompt_tokens)
    rows = []
    for _, row in df.iterrows():
        path = run_dir / "exports" / f"trial-{int(row['trial'])}.gguf"
        if not path.is_file():
            built = rb.build(front.recipe(int(row["trial"])))
            path.parent.mkdir(exist_ok=True)
            write_gguf(path, built.model, built.cache, built.formats, built.source, built.tokenizer)
        rows.append({"trial": row["trial"], **ev.evaluate_file(str(path))})
    return df.merge(pd.DataFrame(rows), on="trial", how="left")
