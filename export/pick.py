"""`pick`: take a point from a run's front and export it (GGUF for llama.cpp, HF safetensors).

The model is rebuilt exactly as the search evaluated it: same source, same prepared variants,
the trial's recipe applied with compress.apply.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import pandas as pd

from llmpareto import atomic
from llmpareto.errors import UserError
from llmpareto.front import Front
from llmpareto.query import where
from llmpareto.recipe import Recipe
from llmpareto.rundir import RunDir
from llmpareto.search.workbench import Built, Workbench
from llmpareto.structure import is_per_block

EXPORT_FORMATS = ("gguf", "hf")


def build(run_dir: Path, recipe: Recipe) -> Built:
    return Workbench.from_run(run_dir).build(recipe)


def choose(front: Front, trial: int | None, best: str | None, expr: str | None) -> pd.Series:
    """The front point to export; a trial off the front is refused with the nearest one."""
    if trial is not None:
        if trial in set(front.df["trial"]):
            return front.pick(trial=trial)
        trials = front.trials if front.trials is not None else front.df
        if trial not in set(trials["trial"]):
            raise UserError(f"trial {trial} does not exist in {front.run_dir}; front trials: "
                            f"{', '.join(map(str, front.df['trial']))}")
        row = trials[trials["trial"] == trial].iloc[0]
        why = "is not feasible" if not bool(row["feasible"]) else "is not on the Pareto front"
        x = next(o for o in front.objectives if o.endswith(("_bytes", "_ms")))
        near = front.df.iloc[(front.df[x] - row[x]).abs().argsort()[:1]]
        raise UserError(f"trial {trial} {why}; the nearest front point by {x} is trial "
                        f"{int(near['trial'].iloc[0])} (pass --trial {int(near['trial'].iloc[0])})")
    if best is None:
        raise UserError("say which point: --trial N, or --best METRIC [--where EXPR]")
    rows = where(front.df, expr)
    if rows.empty:
        raise UserError(f"no front point satisfies --where {expr!r}")
    if best not in rows.columns:
        raise UserError(f"--best {best!r} is not a column; try perplexity, memory_bytes, latency_ms")
    return rows.loc[rows[best].idxmin()]


def model_card(run_dir: Path, row: pd.Series, recipe: Recipe, formats: dict, written: list[str],
               command: str, pruned: dict | None = None, hf_kind: str = "dense") -> str:
    info = RunDir(run_dir).read_run_json()
    s = info["settings"]
    counts = pd.Series([f or "unchanged (f32)" for f in formats.values()]).value_counts()
    metrics = [c for c in ("perplexity", "kl_nats", "memory_bytes", "weights_bytes", "latency_ms",
                           "prefill_ms", "energy_mj", "decode_tokens_per_s") if c in row.index
               and pd.notna(row[c])]
    lines = [
        f"# {Path(info['model']['source']).name} compressed by llmpareto (trial {int(row['trial'])})",
        "", f"- Source model: `{s['model']}` ({info['model']['source']})",
        (f"- Device: `{s.get('device', 'none')}`; budget: max_memory={s.get('max_memory')}, "
         f"max_latency_ms={s.get('max_latency_ms')}, max_energy_mj={s.get('max_energy_mj')}, "
         f"context={s['context']}"),
        f"- Run: `{run_dir}`, study `{s['study']}`, seed {s['seed']}",
        "", "## Recipe (tensors per format)", "",
        *[f"- {fmt}: {n}" for fmt, n in counts.items()],
        *([f"- student of the source model: {recipe.structure}"] if recipe.structure else []),
        "", "Full recipe: `recipe.json`.", "", "## Predicted metrics (search time)", "",
        *[f"- {m}: {row[m]:.6g}" for m in metrics],
        "", "## Files", "",
        *[f"- `{w}`" for w in written],
        "", ("The GGUF file holds each tensor in its recipe's format and is the compressed "
             "artifact (llama.cpp, transformers' GGUF loader). The `hf/` folder stores the same "
             "weights dequantized to float32: it is for research and fine-tuning, not "
             "deployment."),
        *_sparsity_card(pruned or {}, formats, hf_kind),
        *(["", ("Per-block student: `model.gguf` is llama.cpp's `deci` architecture, each "
                "block at its own MLP width and KV groups (the memory and speed the search "
                "predicted). The `hf/` folder pads every block with zeros up to the widest one "
                "(numerically the same outputs; the memory the cuts saved is not saved there).")]
          if is_per_block(recipe.structure) else []),
        "", "## Reproduce", "", f"```\n{command}\n```", "",
    ]
    return "\n".join(lines)


def _distilled(run_dir: Path, trial: int, recipe: Recipe, built: Built) -> Built:
    """The same candidate with the weights `llmpareto distill` recovered, in its formats."""
    from safetensors.torch import load_file

    from llmpareto.compress import apply
    from llmpareto.search.distill_run import distill_dir

    path = distill_dir(run_dir, trial) / "student.safetensors"
    if not path.is_file():
        raise UserError(f"trial {trial} has not been distilled: run `llmpareto distill "
                        f"{run_dir} --trial {trial} --steps N` first, or drop --distilled")
    built.cache.set_override(load_file(str(path)))
    apply(built.model, recipe, built.cache)
    return built


def _recovered(run_dir: Path, trial: int, recipe: Recipe, built: Built) -> Built:
    """The same candidate with the weights the search's recovery learned (bit for bit those
    it scored: weights on their grids are packed by the format's own quantizer)."""
    from llmpareto.search.recover import load_recovered, use_recovered

    got = load_recovered(run_dir, trial)
    if got is None:
        raise UserError(f"trial {trial} was recovered but {run_dir}/recover/trial-{trial}"
                        ".safetensors is gone; pass --no-recovered to export its post-training "
                        "weights, or --resume the search to recover it again")
    use_recovered(built, recipe, *got)
    return built


def _sparsity_card(pruned: dict, formats: dict, hf_kind: str) -> list[str]:
    if not pruned:
        return []
    pats = pd.Series([p if ":" in p else f"unstructured {round(100 * lv)}%"
                      for p, lv in pruned.values()]).value_counts()
    quantized = sorted({formats[f] for f in pruned if formats.get(f) not in (None, "f16")})
    return ["", "## Sparsity", "", *[f"- {p}: {n} tensors" for p, n in pats.items()], "",
            ("`model.gguf` stores the pruned weights as zeros: llama.cpp runs them at dense "
             "speed and size (it has no sparse kernels)."),
            "", (f"`hf/` is compressed-tensors `{hf_kind}` (kept values, a 1-bit mask per weight, "
                 "and in config.json `quantization_config.sparsity_config`), the layout vLLM "
                 "(<= 0.19.0; later releases dropped 2:4) and llm-compressor read. "
                 "transformers 5 alone does not decompress it: load it with llmpareto "
                 "(`--model hf/`, or `llmpareto.sparse_folder.load_compressed`)."),
            *(["", (f"Pruned tensors in {', '.join(quantized)} are stored dequantized (float32, "
                    "the values the search scored): compressed-tensors has no layout that holds "
                    "a GGUF block format and sparsity together.")] if quantized else [])]


def pick(run_dir: str | Path, out: str | Path, trial: int | None = None, best: str | None = None,
         where_expr: str | None = None, formats: str | list[str] = "gguf,hf",
         force: bool = False, distilled: bool = False, recovered: bool = True) -> Path:
    """Export one front point of `run_dir` into `out` (its distilled weights with
    `distilled`, from `llmpareto distill`; the search's recovered ones, when it has them and
    `recovered`); returns `out`."""
    from llmpareto.export.hf import write_hf
    from llmpareto.gguf_write import write_gguf

    run_dir, out = Path(run_dir), Path(out)
    kinds = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    bad = [k for k in kinds if k not in EXPORT_FORMATS]
    if bad or not kinds:
        raise UserError(f"--format {','.join(kinds)}: choose from {', '.join(EXPORT_FORMATS)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give the path of a folder to export into")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise UserError(f"--out {out}: a part of that path is a file, not a folder; choose "
                        f"another --out")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to overwrite it")
    front = Front.load(run_dir)
    trials = front.trials if front.trials is not None else front.df
    if distilled and trial is not None and trial in set(trials["trial"]):
        row = trials[trials["trial"] == trial].iloc[0]  # recovered: it may beat the front now
    else:
        row = choose(front, trial, best, where_expr)
    recipe = front.recipe(int(row["trial"]))
    built = build(run_dir, recipe)
    if distilled:
        built = _distilled(run_dir, int(row["trial"]), recipe, built)
    elif recovered and pd.notna(row.get("recover_steps")):
        built = _recovered(run_dir, int(row["trial"]), recipe, built)
    if "gguf" in kinds:  # refuse before writing anything
        from llmpareto.gguf_write import _check_gguf_formats

        _check_gguf_formats(built.formats)
    # Write next to the target and move into place at the end, so a failure never leaves a
    # half-written export (or, with --force, destroys the old one first).
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create {out.parent} ({exc.strerror})") from None
    stale = out.with_name(out.name + ".partial")  # left by exports before atomic_dir
    if stale.is_dir():
        shutil.rmtree(stale)
    atomic.remove_stale(out.parent, target=out.name)  # a killed pick's (never a live one's)
    with atomic.atomic_dir(out, replace=True) as tmp:
        written = ["recipe.json", "README.md"]
        recipe.save(tmp / "recipe.json")
        if "gguf" in kinds:
            write_gguf(tmp / "model.gguf", built.model, built.cache, built.formats, built.source,
                       built.tokenizer)
            written.append("model.gguf")
        hf_kind = "dense"
        if "hf" in kinds:
            hf_kind = write_hf(tmp / "hf", built)
            written.append("hf/")
        command = "llmpareto pick " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if sys.argv[1:2] == ["pick"] else \
            f"llmpareto pick {run_dir} --trial {int(row['trial'])} --out {out} --format " \
            f"{','.join(kinds)}"
        pruned = {f: sp for f, sp in built.cache.current_sparsity.items()
                  if sp is not None and f in built.formats}  # the kept tensors, original names
        atomic.write_text(tmp / "README.md", model_card(run_dir, row, recipe, built.formats,
                                                        written, command, pruned, hf_kind))
    return out
