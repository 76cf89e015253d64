"""Sensitivity profile (HAWQ / AutoQuantize style): for each search-space key and each of its
choices, the KL increase over the reference when only that key is compressed; and the cheap KL
screens the evolutionary strategy selects with. Cached as RUN/sensitivity.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmpareto.errors import UserError
from llmpareto.evaluators.quality import kl_per_token, log_probs64
from llmpareto.placement import ids_on
from llmpareto.recipe import Recipe
from llmpareto.search.sensitivity_file import FILE, VERSION, read_profile


def sub_windows(calib: np.ndarray, tokens: int) -> np.ndarray:
    """The first `tokens` calibration tokens as windows: a prefix of the first window, or
    whole windows (fewer when the text has fewer)."""
    if len(calib) == 0:
        raise UserError("the sensitivity profile is measured on calibration text: set "
                        "--calib-tokens > 0, or use --strategy nsga2|tpe|random")
    width = calib.shape[1]
    if tokens <= width:
        return calib[:1, :max(2, tokens)]
    return calib[:math.ceil(tokens / width)]


def reference_params(space) -> dict[str, Any]:
    """Each key's least compressed choice: the most bits, no pruning, the teacher's shape."""
    from llmpareto.formats import get_format
    from llmpareto.spaces.sparsity import PREFIX as SPARSE
    from llmpareto.spaces.students import PREFIX as STUDENT

    out = {}
    for k, c in space.choices.items():
        if k.startswith(SPARSE):
            out[k] = min(c)
        elif k.startswith(STUDENT):
            out[k] = max(c)
        else:
            out[k] = max(c, key=lambda f: get_format(f).bits_per_weight)
    return out


class KLScreen:
    """KL(base || candidate) on a few calibration tokens, by one forward pass. When a recipe
    differs from `reference` only from block L on, blocks 0..L-1 are not run again: their
    outputs under the reference are cached (Llama-style `model.layers`, `norm`, `lm_head`)."""

    def __init__(self, runner, tokens: int, reference: Recipe | None = None) -> None:
        from llmpareto.compress import apply

        self.runner, self.tokens = runner, tokens
        self.ids = ids_on(runner.model, sub_windows(runner.windows.calib, tokens))
        model, arch = runner.model, runner.arch
        apply(model, Recipe({}), runner.cache)  # the base weights, whatever a trial left
        with torch.inference_mode():
            self.base = log_probs64(model(input_ids=self.ids, use_cache=False).logits.float())
        self.reference = reference or Recipe({})
        self.ref_formats = arch.formats_for(self.reference)
        self.ref_sparsity = arch.sparsity_for(self.reference)
        self.layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
        self.hidden: list[tuple[tuple, dict]] = []
        if (self.layers and hasattr(model.model, "norm") and hasattr(model, "lm_head")
                and not self.reference.structure):
            apply(model, self.reference, runner.cache)
            self._cache_block_inputs()
        self.layer_of = {t.fqn: t.layer for t in arch.tensors}

    @torch.inference_mode()
    def _cache_block_inputs(self) -> None:
        from llmpareto.compress.calibration import _Stop

        caught: list = []

        def catch(module, args, kwargs):
            caught.append((args, kwargs))
            raise _Stop

        h = self.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.runner.model(input_ids=self.ids, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        args, kwargs = caught[0]
        for layer in self.layers:
            self.hidden.append((args, kwargs))
            out = layer(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            args, kwargs = ((hidden, *args[1:]), kwargs) if args else \
                ((), {**kwargs, "hidden_states": hidden})
        self.hidden.append((args, kwargs))  # the last block's output: the final norm's input

    def first_block(self, recipe: Recipe) -> int:
        """The first block whose weights `recipe` changes (0: run the whole model)."""
        arch = self.runner.arch
        if not self.hidden or recipe.structure:
            return 0
        sparsity = arch.sparsity_for(recipe)
        changed = [f for f, v in arch.formats_for(recipe).items() if v != self.ref_formats[f]]
        changed += [f for f in set(sparsity) | set(self.ref_sparsity)
                    if sparsity.get(f) != self.ref_sparsity.get(f)]
        layers = [self.layer_of.get(f) for f in changed]
        if any(v is None for v in layers):  # embedding (tied: the head too) or head
            heads = [f for f, v in zip(changed, layers) if v is None]
            only_head = arch.lm_head is not None and all(f == arch.lm_head.fqn for f in heads)
            return len(self.layers) if only_head and len(heads) == len(changed) else 0
        return min(layers, default=len(self.layers))

    @torch.inference_mode()
    def kl(self, recipe: Recipe) -> float:
        from llmpareto.compress import apply

        model = self.runner.model
        apply(model, recipe, self.runner.cache)
        start = self.first_block(recipe)
        if start == 0:
            logits = model(input_ids=self.ids, use_cache=False).logits
        else:
            args, kwargs = self.hidden[start]
            for layer in self.layers[start:]:
                out = layer(*args, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else \
                    ((), {**kwargs, "hidden_states": hidden})
            hidden = args[0] if args else kwargs["hidden_states"]
            logits = model.lm_head(model.model.norm(hidden))
        return float(kl_per_token(self.base, logits).mean())


def _identity(runner) -> dict[str, Any]:
    s = runner.settings
    return {"model_sha256": runner.cache.fingerprint(), "text_sha256": runner.windows.sha256,
            "space": runner.space.name, "quantizer": runner.cache.quantizer.settings(),
            "tokens": s.sensitivity_tokens,
            "choices": {k: list(c) for k, c in runner.space.choices.items()}}


def measure(runner, progress: bool = False) -> dict[str, Any]:
    """The profile of `runner`'s space: one KL per distinct (key, choice) recipe."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    space, arch = runner.space, runner.arch
    ref = reference_params(space)
    screen = KLScreen(runner, runner.settings.sensitivity_tokens, space.recipe_from_params(ref))
    seen: dict[str, float] = {}

    def kl_of(params) -> float:
        recipe = space.recipe_from_params(params)
        key = json.dumps([sorted(arch.formats_for(recipe).items()),
                          sorted(arch.sparsity_for(recipe).items()), recipe.structure],
                         sort_keys=True, default=str)
        if key not in seen:
            seen[key] = screen.kl(recipe)
        return seen[key]

    total = sum(len(c) for c in space.choices.values())
    base = kl_of(ref)
    delta: dict[str, list[float]] = {}
    with tqdm(total=total, desc="sensitivity", unit="choice", disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        for k, choices in space.choices.items():
            delta[k] = [0.0 if c == ref[k] else kl_of({**ref, k: c}) - base for c in choices]
            bar.update(len(choices))
    from llmpareto.compress import apply

    apply(runner.model, Recipe({}), runner.cache)
    return {"version": VERSION, **_identity(runner), "reference": ref,
            "reference_kl_nats": base, "delta_kl_nats": delta,
            "seconds": round(time.perf_counter() - t0, 3), "evaluations": len(seen)}


def check(data: dict[str, Any], runner, where: str) -> dict[str, Any]:
    """`data` if it was measured on this model, text, space and quantizer; else a UserError
    naming what differs."""
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise UserError(f"{where} is not a llmpareto sensitivity profile (version {VERSION}); "
                        "delete it or pass another --sensitivity")
    want = _identity(runner)
    names = {"model_sha256": "model weights", "text_sha256": "calibration text",
             "space": "search space", "quantizer": "quantizer", "tokens": "--sensitivity-tokens",
             "choices": "space choices (--formats/--granularity/levels)"}
    bad = [names[k] for k in want if data.get(k) != want[k]]
    if bad:
        raise UserError(f"{where} was measured for another {', '.join(bad)} than this run's; "
                        "drop --sensitivity (it is then measured here) or give the profile of "
                        "a run with the same model, text and space")
    return data


def load_or_measure(runner, run_dir: Path | None, progress: bool = False) -> dict[str, Any]:
    """--sensitivity FILE, else RUN/sensitivity.json (a resumed run), else measured now and
    written to RUN/sensitivity.json."""
    given = runner.settings.sensitivity
    path = Path(given) if given else (run_dir / FILE if run_dir is not None else None)
    if path is not None and path.is_file():
        data = check(read_profile(path), runner, f"sensitivity profile {path}")
    elif given:
        raise UserError(f"--sensitivity {given}: no such file; give a sensitivity.json of an "
                        "earlier run, or leave the flag out to measure one")
    else:
        runner.prepare(progress)  # the variants trials use anyway: not counted as profiling
        data = measure(runner, progress)
        path = None
    if run_dir is not None and (path is None or (run_dir / FILE) != path):
        from llmpareto.rundir import RunDir

        RunDir(run_dir).write_json(run_dir / FILE, data)
    return data
