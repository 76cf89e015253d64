"""Benchmark of recovery against post-training quantization (issue 26, first part) on the
default model: uniform formats made by round-to-nearest, with an importance matrix, by GPTQ,
and recovered: block-wise reconstruction from round-to-nearest (compress/reconstruct.py, AutoRound's
start) and the search's recovery methods (search/recover_methods.py: REGISTRY; reconstruction from the
importance matrix's codes with held-out early stopping, end-to-end distillation, QAT) from the
importance-matrix point, each scored as KL to the base model and perplexity on

- the run's evaluation windows (CPython docs, never calibrated on), and
- an evaluation text of another domain that nothing here trains or calibrates on (default:
  Python's history and license, shipped in llmpareto/texts/; `--eval-text FILE` for another),

with the seconds each method took (calibration statistics plus quantizing, or learning).

With `--students 24[:0.75]` it measures students instead (blocks kept by Block Influence, the
MLP width ratio after the colon, f16): undistilled, and recovered by each of `--methods`
(`refit`: least-squares, closed form; `local`: blockwise local distillation, `distill`:
end-to-end; `refit+distill`: one after the other) with `--distill-steps` steps.

Run: python -m llmpareto.bench.bench_recovery [--formats q4_0,q4_1] [--steps 200]
     [--methods reconstruct-rtn,reconstruct,distill,qat] [--distill-steps 10]
     [--calib-tokens 4096] [--eval-text FILE] [--out DIR]   (--quick: to check that it runs)
     python -m llmpareto.bench.bench_recovery --students 24,24:0.75 --methods refit,distill,refit+distill
     python -m llmpareto.bench.bench_recovery --recipe runs/<study>/recipes/<trial>.json
         [--ladder --distill-steps 8]   (one front point; --ladder: the ladder's gain over a
         restart: QAT from reconstruction's weights against QAT from the post-training point)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

WINDOW = 256


def default_eval_text() -> Path:
    from llmpareto.text import DEFAULT_EVAL_TEXT, eval_text_path

    return eval_text_path(DEFAULT_EVAL_TEXT)  # Python's history and license, shipped


def _runner(quantizer: str, calib: int, evals: int):
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    return TrialRunner(SearchSettings(quantizer=quantizer, calib_tokens=calib, eval_tokens=evals,
                                      window=WINDOW, presets="none", progress=False,
                                      disk_cache="off"))


def text_windows(runner, path: Path, max_tokens: int) -> np.ndarray:
    """Windows of `path` as the model runs (BOS first when it adds one), up to max_tokens."""
    from llmpareto.text import with_bos

    ids = np.asarray(runner.tokenizer(path.read_text(encoding="utf-8"),
                                      add_special_tokens=False)["input_ids"], dtype=np.int64)
    span = WINDOW - (runner.bos is not None)
    n = min(len(ids) // span, max(1, max_tokens // WINDOW))
    return with_bos(ids[: n * span].reshape(n, span), runner.bos)


class Scorer:
    """KL to the base model and perplexity on each text, the base computed once."""

    def __init__(self, model, texts: dict[str, np.ndarray]) -> None:
        from llmpareto.evaluators.quality import KLEvaluator, PerplexityEvaluator

        self.ppl = {k: PerplexityEvaluator(w) for k, w in texts.items()}
        self.kl = {k: KLEvaluator(w) for k, w in texts.items()}
        for ev in self.kl.values():
            ev.set_base(model)

    def __call__(self, model) -> dict[str, float]:
        from llmpareto.evaluators.base import Candidate

        cand = Candidate(None, {}, model)
        out = {}
        for k in self.ppl:
            out[f"{k}_perplexity"] = self.ppl[k].evaluate(cand)["perplexity"]
            out[f"{k}_kl_nats"] = self.kl[k].evaluate(cand)["kl_nats"]
        return out


def _swap(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """Put `weights` (fqn -> weight) into `model` as new Parameters; returns the old ones."""
    old = {}
    for fqn, w in weights.items():
        mod = model.get_submodule(fqn)
        old[fqn] = mod.weight
        mod.weight = torch.nn.Parameter(w.to(mod.weight.dtype), requires_grad=False)
    return old


def blockwise(runner, fmt: str, steps: int, batch: int) -> tuple[dict[str, torch.Tensor], float]:
    """Block-wise reconstruction of every linear of every block onto `fmt`, learned on the
    run's calibration windows only; (fqn -> weight, seconds)."""
    from llmpareto.compress.reconstruct import block_inputs, reconstruct_model

    model = runner.model
    layers = list(model.model.layers)
    t0 = time.perf_counter()
    calib = torch.as_tensor(runner.windows.calib)
    first = [block_inputs(layers, lambda i=i: model(input_ids=calib[i:i + 1], use_cache=False))[0]
             for i in range(len(calib))]
    by_layer: dict[int, dict[str, str]] = {}
    for t in runner.arch.linears:
        if t.layer is not None:
            by_layer.setdefault(t.layer, {})[t.fqn.split(f"layers.{t.layer}.", 1)[1] + ".weight"] \
                = fmt
    weights, reports = reconstruct_model(layers, first, [by_layer[i] for i in range(len(layers))],
                                         steps=steps, batch=batch)
    out = {}
    for i, w in enumerate(weights):
        prefix = runner.arch.linears[0].fqn.split("layers.")[0] + f"layers.{i}."
        out.update({prefix + name.removesuffix(".weight"): t for name, t in w.items()})
    ratio = float(np.mean([r.mse / r.mse_rtn for r in reports if r.mse_rtn > 0]))
    print(f"  {fmt}: block MSE after / before (mean over blocks) {ratio:.3f}", flush=True)
    return out, time.perf_counter() - t0


def learned(runner, method: str, recipe, steps: int, start=None):
    """(weights, exact, seconds) of one of the search's recovery methods on `recipe`, learned
    on the calibration text (a quarter as many windows held out), from `start` (weights an
    earlier rung kept, and their `exact`) or the post-training point."""
    from llmpareto.search.recover import REGISTRY, recovery_windows

    runner.settings.recover_tokens = runner.settings.calib_tokens
    learn, held = recovery_windows(runner)
    t0 = time.perf_counter()
    weights, exact = REGISTRY[method].run(runner, recipe, learn, steps, 0, False, held, start)
    return weights, exact, time.perf_counter() - t0


def registered(runner, method: str, fmt: str, steps: int, scorer, recipe=None,
               label: str = "", start=None, keep: dict | None = None) -> dict:
    """One of the search's recovery methods on the uniform `fmt` point of `runner`'s quantizer
    (or on `recipe`, named `fmt`), from `start` or the post-training point, scored; `keep`
    receives its weights under the method's name."""
    from llmpareto.recipe import Recipe
    from llmpareto.search.recover import use_recovered

    recipe = recipe or Recipe({"_default": {"format": fmt}})
    weights, exact, secs = learned(runner, method, recipe, steps, start)
    if keep is not None:
        keep[method] = (weights, exact)
    try:
        use_recovered(runner, recipe, weights, exact)
        scores = scorer(runner.model)
    finally:
        runner.cache.set_override({})
    return {"format": fmt, "method": f"recovery {method} ({steps} steps, from PTQ "
            f"{runner.settings.quantizer}){label}", "seconds": secs,
            "s_per_step": secs / max(1, steps), **scores}


def recipe_rows(path: Path, steps: int, calib: int, evals: int, eval_text: Path) -> pd.DataFrame:
    """A front point's recipe (runs/<study>/recipes/<trial>.json): PTQ with the importance
    matrix, then block-wise reconstruction leaving the tensors its formats hold exactly as they
    are (the search's rule), and learning them too (the rule off), each scored."""
    from llmpareto.compress import apply
    from llmpareto.recipe import Recipe
    from llmpareto.search import recover_methods

    recipe = Recipe.load(path)
    runner = _runner("imatrix", calib, evals)
    apply(runner.model, Recipe({}), runner.cache)
    scorer = Scorer(runner.model, {"eval": runner.windows.eval,
                                   "eval_text": text_windows(runner, eval_text, evals)})
    rows = [{"format": "f16 (base)", "method": "-", "seconds": 0.0, **scorer(runner.model)}]
    apply(runner.model, recipe, runner.cache)
    name = path.stem if path.stem != "recipe" else str(path)
    rows.append({"format": name, "method": "PTQ imatrix", "seconds": runner.calibrate_s,
                 **scorer(runner.model)})
    formats = runner.arch.formats_for(recipe)
    blocks = [t.fqn for t in runner.arch.linears if t.layer is not None]
    exact = [f for f in blocks if formats.get(f) not in (None, "f16")
             and recover_methods.holds_exactly(runner.cache, f, formats[f])]
    print(f"{name}: {len(exact)} of {len(blocks)} block linears held exactly by their format",
          flush=True)
    rule = recover_methods.EXACT_RTOL
    for rtol, label in ((rule, ", exact tensors left as they are"),
                        (-1.0, ", exact tensors learned too")):
        recover_methods.EXACT_RTOL = rtol
        recover_methods._exact_memo.clear()
        try:
            rows.append(registered(runner, "reconstruct", name, steps, scorer, recipe, label))
        finally:
            recover_methods.EXACT_RTOL = rule
            recover_methods._exact_memo.clear()
        print(rows[-1], flush=True)
        if not exact:
            break  # the two rows would be the same
    return pd.DataFrame(rows)


def ladder_rows(path: Path, steps: int, distill_steps: int, calib: int, evals: int,
                eval_text: Path) -> pd.DataFrame:
    """The ladder's gain over restarting, on a front point's recipe: PTQ with the importance
    matrix; block-wise reconstruction (`steps`, round 0 of the search's ladder); QAT
    (`distill_steps`) from the post-training point (a restart); and QAT for as many steps from
    the weights reconstruction learned (round 1 of the ladder), each scored."""
    from llmpareto.compress import apply
    from llmpareto.recipe import Recipe

    recipe = Recipe.load(path)
    runner = _runner("imatrix", calib, evals)
    apply(runner.model, Recipe({}), runner.cache)
    scorer = Scorer(runner.model, {"eval": runner.windows.eval,
                                   "eval_text": text_windows(runner, eval_text, evals)})
    rows = [{"format": "f16 (base)", "method": "-", "seconds": 0.0, **scorer(runner.model)}]
    apply(runner.model, recipe, runner.cache)
    name = path.stem
    rows.append({"format": name, "method": "PTQ imatrix", "seconds": runner.calibrate_s,
                 **scorer(runner.model)})
    kept: dict = {}
    for method, n, start, label in (
            ("reconstruct", steps, None, " (rung 0)"),
            ("qat", distill_steps, None, ", a restart"),
            ("qat", distill_steps, "reconstruct", " (rung 1)")):
        rows.append(registered(runner, method, name, n, scorer, recipe, label,
                               start=kept.get(start), keep=kept))
        if start is not None:
            rows[-1]["method"] = rows[-1]["method"].replace("from PTQ imatrix", "from rung 0")
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def students(specs: list[str], methods: tuple[str, ...], steps: int, calib: int, evals: int,
             eval_text: Path) -> pd.DataFrame:
    """Each student `blocks[:mlp_ratio]` (f16), undistilled and recovered by each method from
    the same start, learned on the calibration text (a quarter as many windows held out)."""
    from llmpareto.compress import apply
    from llmpareto.compress.restructure import block_influence, keep_blocks
    from llmpareto.recipe import Recipe

    runner = _runner("imatrix", calib, evals)
    apply(runner.model, Recipe({}), runner.cache)
    scorer = Scorer(runner.model, {"eval": runner.windows.eval,
                                   "eval_text": text_windows(runner, eval_text, evals)})
    rows = [{"format": "f16 (base)", "method": "-", "seconds": 0.0, **scorer(runner.model)}]
    print(rows[-1], flush=True)
    influence = block_influence(runner.model, runner.windows.calib)
    for spec in specs:
        blocks, _, ratio = spec.partition(":")
        structure = {"layers": keep_blocks(influence, int(blocks))}
        if ratio:
            structure["mlp_ratio"] = float(ratio)
        recipe = Recipe({"_default": {"format": "f16"}}, structure=structure)
        runner.build(recipe)
        name = f"student {spec} f16"
        rows.append({"format": name, "method": "undistilled", "seconds": 0.0,
                     **scorer(runner.model)})
        print(rows[-1], flush=True)
        from llmpareto.search.recover import REGISTRY, recovery_windows, use_recovered

        runner.settings.recover_tokens = runner.settings.calib_tokens
        learn, held = recovery_windows(runner)
        for m in methods:  # "a+b": b continues from a's weights, as the search's ladder
            t0, got = time.perf_counter(), None
            for part in m.split("+"):
                got = weights, exact = REGISTRY[part].run(runner, recipe, learn, steps, 0,
                                                          False, held, got)
            secs = time.perf_counter() - t0
            try:
                use_recovered(runner, recipe, weights, exact)
                rows.append({"format": name, "method": f"recovery {m} ({steps} steps)",
                             "seconds": secs, "s_per_step": secs / max(1, steps),
                             **scorer(runner.model)})
            finally:
                runner.cache.set_override({})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def _ptq_label(runner, q: str, fmt: str) -> str | None:
    """The row's method: `PTQ q`, or for GPTQ on a format it does not target, what it really
    reaches (the tensors whose rows fall back to a format it does, e.g. q3_K's q4_0 rows where
    a row is not a multiple of 256) or None when it reaches nothing."""
    from llmpareto.recipe import Recipe

    quantizer, arch = runner.cache.quantizer, runner.cache.arch
    if q != "gptq" or quantizer.targets(fmt):
        return f"PTQ {q}"
    real = arch.formats_for(Recipe({"_default": {"format": fmt}}))  # with llama.cpp's fallbacks
    sizes = {}
    for t in arch.linears:
        if quantizer.calibrates(real[t.fqn]):  # GPTQ rounds it (not f16, not llama.cpp's)
            sizes[real[t.fqn]] = sizes.get(real[t.fqn], 0) + t.numel
    if not sizes:
        return None
    share = sum(sizes.values()) / sum(t.numel for t in arch.linears)
    return (f"PTQ gptq on the {'/'.join(sorted(sizes))} fallback rows ({share:.0%} of the "
            "linear weights; the rest llama.cpp's quantizer, no imatrix)")


def _needs_imatrix(runner, fmt: str) -> bool:
    """Whether llama.cpp refuses to quantize any of the format's tensors (its fallbacks
    applied) without an importance matrix (iq2_xxs, iq2_xs, ...)."""
    from llmpareto import ggml
    from llmpareto.formats import get_format
    from llmpareto.recipe import Recipe

    real = set(runner.cache.arch.formats_for(Recipe({"_default": {"format": fmt}})).values())
    return any(get_format(f).gguf_type is not None and ggml.requires_imatrix(
        get_format(f).gguf_type) for f in real if f != "f16")


def run(formats: list[str], steps: int, calib: int, evals: int, eval_text: Path,
        batch: int, methods: tuple[str, ...] = ("reconstruct-rtn", "reconstruct"),
        distill_steps: int = 10) -> pd.DataFrame:
    from llmpareto.compress import apply
    from llmpareto.recipe import Recipe

    rows = []
    scorer = None
    for q in ("rtn", "imatrix", "gptq"):
        t0 = time.perf_counter()
        runner = _runner(q, calib, evals)
        calibrate_s = runner.calibrate_s
        if scorer is None:
            apply(runner.model, Recipe({}), runner.cache)
            texts = {"eval": runner.windows.eval,
                     "eval_text": text_windows(runner, eval_text, evals)}
            scorer = Scorer(runner.model, texts)
            rows.append({"format": "f16 (base)", "method": "-", "seconds": 0.0,
                         **scorer(runner.model)})
            print(f"load {time.perf_counter() - t0:.1f} s; eval text {eval_text}: "
                  f"{texts['eval_text'].size} tokens", flush=True)
        for fmt in formats:
            if q == "rtn" and _needs_imatrix(runner, fmt):
                print(f"PTQ rtn at {fmt}: llama.cpp quantizes it only with an importance "
                      "matrix: no row", flush=True)
                continue
            label = _ptq_label(runner, q, fmt)
            if label is None:
                print(f"PTQ gptq at {fmt}: GPTQ reaches none of its tensors on this model "
                      "(llama.cpp's quantizer makes them): no row", flush=True)
                continue
            before = runner.cache.prepare_seconds
            apply(runner.model, Recipe({"_default": {"format": fmt}}), runner.cache)
            secs = calibrate_s + runner.cache.prepare_seconds - before
            rows.append({"format": fmt, "method": label, "seconds": secs,
                         **scorer(runner.model)})
            print(rows[-1], flush=True)
        if q == "imatrix":  # the search's methods, from the importance-matrix point
            for m in (m for m in methods if m != "reconstruct-rtn"):
                for fmt in formats:
                    rows.append(registered(runner, m, fmt, steps if m == "reconstruct"
                                           else distill_steps, scorer))
                    print(rows[-1], flush=True)
        if q == "rtn" and "reconstruct-rtn" in methods:
            for fmt in (f for f in formats if not _needs_imatrix(runner, f)):  # learned on
                # the run's calibration windows only (a format llama.cpp quantizes only with
                # an importance matrix has no round-to-nearest start)
                apply(runner.model, Recipe({}), runner.cache)
                weights, secs = blockwise(runner, fmt, steps, batch)
                old = _swap(runner.model, weights)
                rows.append({"format": fmt, "method": f"block-wise reconstruction ({steps} steps)",
                             "seconds": secs, **scorer(runner.model)})
                for fqn, param in old.items():  # the very Parameters the cache points at
                    runner.model.get_submodule(fqn).weight = param
                print(rows[-1], flush=True)
        del runner
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="q4_0,q4_1")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4, help="calibration windows per step")
    ap.add_argument("--methods", default="reconstruct-rtn,reconstruct",
                    help="reconstruct-rtn (from RTN, no hold-out) and the search's recovery "
                         "methods: reconstruct, distill, qat")
    ap.add_argument("--distill-steps", type=int, default=10, help="steps of distill and qat")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--eval-text", type=Path, default=default_eval_text())
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--students", default="",
                    help="students to measure instead of formats: blocks kept[:MLP ratio], "
                         "comma-separated (e.g. 24,24:0.75); --methods a+b: b from a's weights")
    ap.add_argument("--recipe", type=Path, default=None,
                    help="a front point's recipe JSON instead of --formats: PTQ and "
                         "reconstruction with and without the exact-tensor rule")
    ap.add_argument("--ladder", action="store_true",
                    help="with --recipe: reconstruction, QAT from the post-training point (a "
                         "restart) and QAT from reconstruction's weights (the search's ladder)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.calib_tokens, a.eval_tokens, a.formats = 4, 2048, 512, "q4_0"
        a.distill_steps = 1
    from llmpareto.search.recover_methods import REGISTRY

    methods = tuple(a.methods.split(","))
    bad = [p for m in methods for p in m.split("+") if m != "reconstruct-rtn" and p not in REGISTRY]
    if bad:
        ap.error(f"--methods: unknown {bad[0]!r}; known: reconstruct-rtn, {', '.join(REGISTRY)}")
    torch.manual_seed(0)
    if a.ladder and not a.recipe:
        ap.error("--ladder needs --recipe FILE (a front point's recipe JSON)")
    if a.recipe and a.ladder:
        df = ladder_rows(a.recipe, a.steps, a.distill_steps, a.calib_tokens, a.eval_tokens,
                         a.eval_text)
    elif a.recipe:
        df = recipe_rows(a.recipe, a.steps, a.calib_tokens, a.eval_tokens, a.eval_text)
    elif a.students:
        df = students(a.students.split(","), methods, a.distill_steps, a.calib_tokens,
                      a.eval_tokens, a.eval_text)
    else:
        df = run(a.formats.split(","), a.steps, a.calib_tokens, a.eval_tokens, a.eval_text,
                 a.batch, methods, a.distill_steps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "recovery.csv", index=False)
    (out / "recovery.json").write_text(json.dumps(df.to_dict(orient="records"), indent=1))
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
