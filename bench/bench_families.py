"""Benchmark of the model families (issue 24): for each family's tiny random model
(llmpareto.tiny.FAMILY_MODELS), a formats search, then each front point exported to GGUF and run
in llama.cpp (llama-cpp-python) on the search's own evaluation windows (BOS first where the
family's tokenizer adds one). Prints per point: search-time perplexity (torch) against llama.cpp's
on the same windows, and the GGUF's tensor bytes and file size against the predicted
weights_bytes. Random weights: the perplexities mean nothing but their agreement.

Run: python -m llmpareto.bench.bench_families [--families a,b] [--trials 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def one(name: str, work: Path, trials: int) -> list[dict]:
    import gguf
    import pandas as pd

    import llmpareto
    from llmpareto.evaluators.llamacpp import gguf_perplexity
    from llmpareto.front import Front
    from llmpareto.gguf_write import write_gguf
    from llmpareto.search.workbench import Workbench
    from llmpareto.tiny import build_family_model

    folder = build_family_model(name, work / name / "model")
    llmpareto.search(model=str(folder), runs_dir=str(work / name / "runs"), study="s",
                     trials=trials, window=64, eval_tokens=512, calib_tokens=256,
                     formats="f16,q8_0,q5_0,q4_0,q4_K,q6_K,tq2_0", presets="none",
                     progress=False)
    run = work / name / "runs" / "s"
    info = json.loads((run / "run.json").read_text())
    front, rb = Front.load(run), Workbench.from_run(run)
    windows = rb.windows.eval
    trials_df = pd.read_csv(run / "trials.csv").set_index("trial")
    rows = []
    for trial in front.df["trial"]:
        built = rb.build(front.recipe(int(trial)))
        path = run / "exports" / f"trial-{int(trial)}.gguf"
        path.parent.mkdir(exist_ok=True)
        write_gguf(path, built.model, built.cache, built.formats, built.source, built.tokenizer)
        tensors = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
        t = trials_df.loc[int(trial)]
        rows.append({"family": name, "bos": info["text"]["windows"]["bos_token_id"],
                     "trial": int(trial), "ppl_search": float(t["perplexity"]),
                     "ppl_llama_cpp": gguf_perplexity(str(path), windows, threads=2),
                     "weights_bytes": int(t["weights_bytes"]), "gguf_tensor_bytes": tensors,
                     "gguf_file_bytes": path.stat().st_size})
    return rows


def main() -> None:
    from llmpareto.tiny import FAMILY_MODELS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILY_MODELS))
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="llmpareto-families-"))
    t0 = time.time()
    print(f"{'family':<14}{'bos':>5}{'trial':>6}{'ppl_search':>12}{'ppl_llama_cpp':>15}"
          f"{'rel_diff':>10}{'weights_bytes':>15}{'gguf_tensor_bytes':>19}{'gguf_file_bytes':>17}")
    for name in args.families.split(","):
        for r in one(name, work, args.trials):
            rel = r["ppl_llama_cpp"] / r["ppl_search"] - 1
            print(f"{r['family']:<14}{r['bos']!s:>5}{r['trial']:>6}{r['ppl_search']:>12.2f}"
                  f"{r['ppl_llama_cpp']:>15.2f}{rel:>+10.2%}{r['weights_bytes']:>15}"
                  f"{r['gguf_tensor_bytes']:>19}{r['gguf_file_bytes']:>17}", flush=True)
    print(f"{time.time() - t0:.0f} s; work folder {work}")


if __name__ == "__main__":
    main()
