"""`llmpareto distill RUN --trial N`: recover a searched candidate (a student, pruned, quantized)
by knowledge distillation from the base model, on the run's text without its evaluation
windows; checkpointed every so many steps and resumed after a kill; the recovered perplexity
is recorded next to the trial's (`distilled_perplexity` in trials.csv and front.csv), and
`pick --distilled` exports the recovered weights.

Only the searched tensors (block projections, embedding, head) are trained, from the
candidate's cut and pruned float weights; pruned weights stay zero. With `qat` the recipe's
formats are applied in every forward pass (straight-through), so the exported file holds the
weights the training saw.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from llmpareto.errors import UserError
from llmpareto.recipe import Recipe
from llmpareto.rundir import RunDir


def distill_dir(run_dir: Path, trial: int) -> Path:
    return Path(run_dir) / "distill" / f"trial-{trial}"


def training_windows(tokenizer, settings, seq_len: int, bos: int | None = None) -> np.ndarray:
    """Every window of the run's text that is not an evaluation window, cut to `seq_len`, as
    the model runs (BOS first when `bos`, as the search's windows)."""
    from llmpareto.text import make_windows, read_text, with_bos

    text, desc = read_text(settings.text)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    window, evals = settings.window, settings.eval_tokens
    span = window - (bos is not None)  # text tokens a window holds
    n_eval = -(-evals // window)
    rest = (len(ids) // span - n_eval) * span
    if rest < span:
        raise UserError(f"--text {desc} leaves no tokens outside the evaluation windows to "
                        "distill on; give a longer --text")
    calib, _ = make_windows(ids, span, rest, n_eval * span, source=f"--text {desc}")
    return np.ascontiguousarray(with_bos(calib, bos)[:, :seq_len])


def load_trial_recipe(rd: RunDir, trial: int) -> Recipe:
    path = rd.recipe_path(trial)
    if not path.is_file():
        known = sorted(int(p.stem) for p in rd.recipes.glob("*.json") if p.stem.isdigit())
        raise UserError(f"trial {trial} does not exist in {rd.path}; trials with recipes: "
                        f"{', '.join(map(str, known)) or 'none'}")
    return Recipe.load(path)


def _student_start(built) -> tuple[dict, dict, dict]:
    """Put the candidate's float weights (cut, pruned; not quantized) into the model and make
    only them trainable; returns (module name -> mask, module name -> format, fqn -> name)."""
    cache, model = built.cache, built.model
    names = {cache.fqn_of_param[id(p)]: n.removesuffix(".weight")
             for n, p in model.named_parameters() if id(p) in cache.fqn_of_param}
    model.requires_grad_(False)
    masks, formats = {}, {}
    for fqn, fmt in built.formats.items():
        sp, sl = cache.current_sparsity[fqn], cache.current_slice[fqn]
        w = (cache.pruned(fqn, sp, sl) if sp else cache.source(fqn, sl)).clone()
        cache.weight(fqn).data = w
        cache.weight(fqn).requires_grad_(True)
        if sp:
            masks[names[fqn]] = w != 0
        if fmt:
            formats[names[fqn]] = fmt
    return masks, formats, names


def record(rd: RunDir, trial: int, values: dict[str, float]) -> None:
    """Store the trial's new columns in study.db (the source of truth: `front --rebuild` and a
    resumed search keep them), then set them in trials.csv and front.csv (atomically)."""
    from llmpareto import atomic

    settings = rd.read_run_json()["settings"]
    if not settings.get("storage") and rd.db.is_file():  # a shared RDB study: CSVs only
        import optuna

        from llmpareto.search.records import record_after_search

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=settings["study"], storage=rd.storage_url)
        record_after_search(study, trial, values)
    for path in (rd.trials_csv, rd.front_csv):
        if not path.is_file():
            continue
        df = pd.read_csv(path)
        rows = df["trial"] == trial
        if not rows.any():
            continue
        for k, v in values.items():
            df.loc[rows, k] = v
        with atomic.atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)


def distill_trial(run_dir: str | Path, trial: int, steps: int, lr: float = 1e-4,
                  batch_size: int = 4, seq_len: int | None = None, temperature: float = 2.0,
                  alpha: float = 0.5, qat: bool = False, checkpoint_every: int = 50,
                  progress: bool = True) -> dict:
    from safetensors.torch import save_file

    from llmpareto.compress import apply
    from llmpareto.compress.distill import distill
    from llmpareto.evaluators.quality import window_nll
    from llmpareto.models import load_model
    from llmpareto.search.workbench import Workbench

    if steps < 1:
        raise UserError(f"--steps {steps}: distil for at least 1 step")
    rd = RunDir(Path(run_dir))
    rd.read_run_json()  # a folder that is no run says so first
    from llmpareto import atomic

    atomic.remove_stale(rd.path)  # a killed distil's temporaries (never a live writer's)
    recipe = load_trial_recipe(rd, trial)
    rb = Workbench.from_run(rd.path)  # a run whose model is gone fails here, naming it
    settings = rb.settings
    seq_len = seq_len or settings.window
    if not 2 <= seq_len <= settings.window:
        raise UserError(f"--seq-len {seq_len}: use 2..{settings.window} (the run's --window)")
    built = rb.build(recipe)
    windows = training_windows(rb.tokenizer, settings, seq_len, rb.bos)
    masks, formats, names = _student_start(built)
    teacher, _ = load_model(rb.source, rb.placement)  # the student's device and dtype
    out = distill_dir(rd.path, trial)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = distill(built.model, teacher, windows, steps, lr=lr, batch_size=batch_size,
                     temperature=temperature, alpha=alpha, keep_zero=masks,
                     qat_formats=formats if qat else None, checkpoint=out / "checkpoint.pt",
                     checkpoint_every=checkpoint_every, progress=progress, seed=settings.seed)
    del teacher
    weights = {fqn: built.cache.weight(fqn).detach().clone().contiguous()
               for fqn in built.formats}
    with atomic.atomic_path(out / "student.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"trial": str(trial)})
    built.model.requires_grad_(False)
    built.cache.set_override(weights)  # the recipe's formats on the distilled weights
    apply(built.model, recipe, built.cache)
    nll, n = window_nll(built.model, rb.windows.eval, settings.batch_size)
    values = {"distilled_perplexity": math.exp(nll / n), "distill_steps": steps}
    record(rd, trial, values)
    return {**values, "seconds": time.perf_counter() - t0, "names": len(names),
            "seconds_per_step": result["seconds_per_step"], "resumed_from": result["resumed_from"],
            "first_loss": result["losses"][0] if result["losses"] else float("nan"),
            "last_loss": result["losses"][-1] if result["losses"] else float("nan")}


def distill_front(run_dir: str | Path, steps: int, rounds: int = 2, **kwargs) -> pd.DataFrame:
    """Multi-fidelity over the front, successive-halving style: every front point is distilled
    `steps` steps, the half that recovered most (relative perplexity gain) continues to twice
    the steps (resuming its checkpoint), and so on for `rounds` rounds. Optuna's pruners and
    Ray Tune's schedulers are single-objective, so the search itself runs at fidelity 0."""
    if rounds < 1:
        raise UserError(f"--rounds {rounds}: at least 1")
    rd = RunDir(Path(run_dir))
    if not rd.front_csv.is_file():
        raise UserError(f"{rd.path} has no front.csv: is it a finished llmpareto run?")
    front = pd.read_csv(rd.front_csv)
    alive = [int(t) for t in front["trial"]]
    base = dict(zip(front["trial"].astype(int), front["perplexity"]))
    rows = []
    for r in range(rounds):
        total = steps * 2 ** r
        for t in alive:
            res = distill_trial(rd.path, t, total, **kwargs)
            rows.append({"round": r, "trial": t, "steps": total, "perplexity": base[t],
                         "distilled_perplexity": res["distilled_perplexity"],
                         "seconds": res["seconds"]})
        gain = {row["trial"]: 1 - row["distilled_perplexity"] / row["perplexity"]
                for row in rows if row["round"] == r}
        alive = sorted(alive, key=lambda t: -gain[t])[:max(1, math.ceil(len(alive) / 2))]
    return pd.DataFrame(rows)
