"""TrialRunner: everything a worker holds once (model, windows, cache, evaluators) and the
one-trial data flow: cost first, then, only if feasible, apply the recipe and score quality.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmpareto.arch import Arch
from llmpareto.budget import Budget, Workload
from llmpareto.compress import apply
from llmpareto.errors import UserError
from llmpareto.evaluators import Candidate, chosen, get_evaluator
from llmpareto.recipe import Recipe
from llmpareto.search.settings import SearchSettings
from llmpareto.search.workbench import Workbench
from llmpareto.spaces import build_space
from llmpareto.units import format_bytes


@dataclass
class TrialResult:
    metrics: dict[str, float]
    constraints: dict[str, float]  # <= 0 is feasible (Optuna's convention)
    formats: dict[str, str | None]
    seconds: dict[str, float] = field(default_factory=dict)
    reused: bool = False  # same effective formats as an earlier trial: its scores, no new pass

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())

    def payload(self) -> dict:
        """What `records.record_trial` stores, as JSON-able values (a Ray worker sends it)."""
        return {"metrics": {k: v if math.isfinite(v) else None for k, v in self.metrics.items()},
                "constraints": dict(self.constraints), "seconds": dict(self.seconds),
                "feasible": self.feasible, "reused": self.reused}


def space_for(settings: SearchSettings, arch: Arch):
    """The search space `settings` describe, on `arch` (no weights needed)."""
    return build_space(settings.space, arch, formats=settings.formats,
                       granularity=settings.granularity, levels=settings.sparsity_levels,
                       pattern=settings.sparsity_pattern, method=settings.sparsity_method,
                       blocks=settings.student_blocks, mlp_ratios=settings.student_mlp_ratios,
                       heads=settings.student_heads,
                       student_granularity=settings.student_granularity)


class TrialRunner(Workbench):
    """The workbench of a search, plus its space, cost and quality evaluators and budget."""

    def __init__(self, settings: SearchSettings, memory_share: float = 1.0) -> None:
        super().__init__(settings, memory_share=memory_share)
        self.space = space_for(settings, self.arch)
        if getattr(self.space, "prunes", False):
            self._set_pruning()
        if getattr(self.space, "restructures", False):
            self._set_students()
        from llmpareto.evaluators.host import load_device

        self.profile = load_device(settings.device)
        self.workload = Workload(prompt_tokens=settings.prompt_tokens, context=settings.context)
        limit = settings.max_memory
        if limit is None or limit > self.profile.memory_bytes:
            limit = self.profile.memory_bytes  # a candidate must fit the device in any case
        self.budget = Budget(settings.device, self.workload, limit, settings.max_latency_ms,
                             settings.max_energy_mj)
        built = {name: self._evaluator(name) for name in chosen(settings.objectives)}
        self.cost = [e for e in built.values() if not e.needs_model]
        self.quality = [e for e in built.values() if e.needs_model]
        self._check_budget()
        self._seen: dict[tuple, TrialResult] = {}

    def _evaluator(self, name: str):
        """Build the registered evaluator `name` from this run's parts."""
        cls = get_evaluator(name)
        ev = {"memory": lambda: cls(self.arch, self.workload, self.profile),
              "latency_energy": lambda: cls(self.arch, self.profile, self.workload),
              "perplexity": lambda: cls(self.windows.eval, self.settings.batch_size),
              "kl": lambda: cls(self.windows.eval, self.settings.batch_size)}[name]()
        if name == "kl":
            ev.set_base(self.model)  # the model still holds its base weights here
        return ev

    def _set_pruning(self) -> None:
        """The pruning statistics (Workbench.set_pruning), then each group's outlier ratio for
        OWL's non-uniform levels."""
        from llmpareto.compress.prune import outlier_ratio

        self.set_pruning()
        sp = self._part("sparsity")
        stats = self.cache.input_stats  # OWL scores: Wanda's metric, or |W| for magnitude

        def score(fqn):
            w = self.cache.base[fqn].abs().double()
            return w * stats[fqn].col_norm.to(w.device)[None, :] if fqn in stats else w

        sp.set_outliers({k: outlier_ratio([lambda f=t.fqn: score(f) for t in ts])
                         for k, ts in sp.groups.items()})

    def preset_baselines(self) -> list[tuple[str, dict, Recipe]]:
        """llama.cpp's presets (Q2_K ... Q8_0) as (label, closest params, whole recipe): the
        per-tensor types llama-quantize assigns this model, read back from llama.cpp itself
        (with the run's importance matrix under --quantizer imatrix); [] when the space has no
        formats or the model has no GGUF form."""
        from llmpareto.compress.quantizers import cache_root
        from llmpareto.spaces.presets import PRESETS, preset_label, presets_cached

        fspace = self._part("formats")
        wanted = PRESETS if self.settings.presets is None else tuple(self.settings.presets)
        if fspace is None or not wanted or self.arch.family is None:
            return []
        q = self.cache.quantizer
        imatrix = q.imatrix if q.name == "imatrix" else None
        root = Path(self.settings.disk_cache) if self.settings.disk_cache not in (None, "off") \
            else cache_root()
        recipes = presets_cached(self.model, self.cache, self.source, self.tokenizer,
                                 self.cache.fingerprint(), root / "presets.json", wanted,
                                 imatrix)
        rest = {k: v for k, v in self.space.baselines()[0][1].items() if k not in fspace.choices}
        same: dict[str, list[str]] = {}  # presets llama.cpp makes alike on this model: one trial
        for name, formats in recipes.items():
            key = json.dumps({k: v for k, v in formats.items() if v is not None}, sort_keys=True)
            same.setdefault(key, []).append(name)
        out = []
        for key, names in same.items():
            formats = json.loads(key)
            recipe = Recipe({fqn: {"format": f} for fqn, f in formats.items()})
            label = preset_label(" = ".join(names)) + (" imatrix" if imatrix else "")
            out.append((label, {**fspace.closest_params(formats), **rest}, recipe))
        return out

    def quantizer_info(self) -> dict:
        """run.json's record of how variants were made."""
        c = self.cache
        out = {**c.quantizer.settings(), "calibrate_s": round(self.calibrate_s, 3)}
        if c.quantizer.name == "imatrix":
            out["imatrix_source"] = c.quantizer.source
        if c.disk is not None:
            out.update(disk_folder=str(c.disk.folder), disk_loaded=c.disk.loaded,
                       disk_saved=c.disk.saved)
        return out

    def write_imatrix(self, path: Path) -> Path | None:
        """The importance matrix this run computed, as a llama.cpp imatrix file (GGUF), so
        `llama-quantize --imatrix` can use the same one."""
        from llmpareto.compress.imatrix import to_gguf_names, write_imatrix
        from llmpareto.families import gguf_arch_of

        q = self.cache.quantizer
        if q.name != "imatrix" or q.source != "on" or not q.imatrix:
            return None
        return write_imatrix(path, to_gguf_names(q.imatrix, self.arch.n_layers,
                                                 gguf_arch_of(self.arch)),
                             int(self.windows.calib.size), chunk_size=self.settings.window,
                             datasets=[f"llmpareto calibration, text {self.windows.sha256[:16]}"])

    def _part(self, name: str):
        """The space itself, or its part of that name in a joint space (None if absent)."""
        return self.space if self.space.name == name else getattr(self.space, name, None)

    def _set_students(self) -> None:
        """Block Influence (which blocks a student keeps) and the input norms that decide its
        MLP channels and attention groups: on the base model, once per run."""
        from llmpareto.compress.restructure import block_influence

        part = self._part("students")
        part.set_block_influence(block_influence(self.model, self.windows.calib,
                                                 self.settings.batch_size))
        self.set_importance()

    def _check_budget(self) -> None:
        """Refuse a budget no candidate in the space can meet, naming the best achievable."""
        candidates = [p for _, p in self.space.baselines()] + [self.smallest_params()]
        results = [self.cost_only(self.space.recipe_from_params(p)) for p in candidates]
        for key, flag, fmt in (("memory_bytes", "--max-memory", format_bytes),
                               ("latency_ms", "--max-latency-ms", lambda v: f"{v:.3g} ms"),
                               ("energy_mj", "--max-energy-mj", lambda v: f"{v:.3g} mJ")):
            if key not in self.budget.constraints(results[0].metrics):
                continue
            best = min(r.metrics[key] for r in results)
            if min(r.constraints[key] for r in results) > 0:
                what = "device memory" if (key == "memory_bytes" and self.settings.max_memory is None
                                          ) else flag
                raise UserError(
                    f"{what} is below the smallest candidate this space can build on "
                    f"{self.profile.name} ({fmt(best)}" + (f" = {int(best)} bytes" if key ==
                    "memory_bytes" else "") + f", at --context {self.settings.context}); relax "
                    f"{flag}, lower --context, or add smaller --formats"
                )

    def smallest_params(self) -> dict[str, str]:
        from llmpareto.formats import get_format
        from llmpareto.spaces.sparsity import PREFIX
        from llmpareto.spaces.students import PREFIX as STUDENT

        return {k: max(c) if k.startswith(PREFIX) else min(c) if k.startswith(STUDENT) else
                min(c, key=lambda f: get_format(f).bits_per_weight)
                for k, c in self.space.choices.items()}

    def prepare_pairs(self) -> list[tuple[str, str]]:
        """Every (tensor, effective format) the space can ask for."""
        from llmpareto.formats import effective_format
        from llmpareto.spaces import FormatSpace

        fspace = self.space if isinstance(self.space, FormatSpace) else getattr(
            self.space, "formats", None)  # pruned variants are prepared on first use
        pairs = []
        for key, tensors in (fspace.groups.items() if fspace else ()):
            for t in tensors:
                for fmt in self.space.choices[key]:
                    pairs.append((t.fqn, effective_format(fmt, t.cols)))
        return list(dict.fromkeys(pairs))

    def prune_items(self) -> list[tuple[str, tuple[str, float]]]:
        """Every (tensor, (pattern, level)) a pruning space can ask for, lowest level first."""
        sp = self._part("sparsity")
        if sp is None:
            return []
        items = []
        for key, tensors in sp.groups.items():
            for level in self.space.choices[key]:
                if level > 0:
                    pattern = sp.pattern
                    items += [(level, t.fqn, (pattern, level)) for t in tensors]
        return [(fqn, sp_) for _, fqn, sp_ in sorted(items, key=lambda x: x[0])]

    def prepare(self, progress: bool = False) -> None:
        """Prepare the variants trials will ask for, with a progress bar: every (tensor,
        format) pair, then (pruning spaces) every pruned tensor while the cache bound allows;
        the rest are made on first use."""
        from tqdm.auto import tqdm

        pairs, items = self.prepare_pairs(), self.prune_items()
        self._warn_variant_cache(pairs)
        with tqdm(total=len(pairs) + len(items), desc="preparing variants", unit="variant",
                  disable=not progress, dynamic_ncols=True, leave=False) as bar:
            self.cache.prepare(pairs, bar)
            self.cache.prepare_pruned(items, bar)

    def _warn_variant_cache(self, pairs: list[tuple[str, str]]) -> None:
        """Say so when the space's packed variants exceed --variant-cache: those beyond it are
        quantized again whenever a trial needs them (large models: seconds each)."""
        import sys

        from llmpareto.formats import get_format

        need = sum(get_format(fmt).nbytes(*self.cache.shapes[f]) for f, fmt in pairs)
        if need > self.cache.packed_bytes:
            print(f"llmpareto: note: this space's packed variants take {format_bytes(need)}, "
                  f"more than --variant-cache {format_bytes(self.cache.packed_bytes)}: the rest "
                  f"are made again whenever a trial needs them; --variant-cache "
                  f"{math.ceil(need / 1e9)}GB keeps them all", file=sys.stderr)

    def cost_only(self, recipe: Recipe) -> TrialResult:
        formats = self.arch.formats_for(recipe)
        cand = Candidate(recipe, formats)
        metrics: dict[str, float] = {}
        for ev in self.cost:
            metrics.update(ev.evaluate(cand))
        return TrialResult(metrics, self.budget.constraints(metrics), formats)

    def where(self) -> dict[str, str | float]:
        """Where this runner's trials run, read off the model's weights (not the settings), and
        the share of its node's memory its caches planned on: a distributed trial records it,
        so a run shows which device and dtype scored it."""
        p = next(self.model.parameters())
        return {"torch_device": str(p.device), "torch_dtype": str(p.dtype).removeprefix("torch."),
                "memory_share": self.memory_share}

    def run(self, recipe: Recipe) -> TrialResult:
        """Score a recipe; a samplers' repeat of an earlier candidate costs nothing."""
        key = (tuple(sorted(self.arch.formats_for(recipe).items(), key=lambda kv: kv[0])),
               tuple(sorted(self.arch.sparsity_for(recipe).items())),
               json.dumps(recipe.structure, sort_keys=True))
        if key in self._seen:
            old = self._seen[key]
            return TrialResult(dict(old.metrics), dict(old.constraints), old.formats, {}, True)
        result = self._run(recipe)
        self._seen[key] = result
        return result

    def _run(self, recipe: Recipe) -> TrialResult:
        t0 = time.perf_counter()
        result = self.cost_only(recipe)
        if not result.feasible:
            for ev in self.quality:
                result.metrics.update({m: math.inf for m in ev.metrics})
            result.seconds = {"cost_s": time.perf_counter() - t0}
            return result
        t1 = time.perf_counter()
        apply(self.model, recipe, self.cache)
        t2 = time.perf_counter()
        cand = Candidate(recipe, result.formats, self.model)
        for ev in self.quality:
            result.metrics.update(ev.evaluate(cand))
        t3 = time.perf_counter()
        result.seconds = {"cost_s": t1 - t0, "apply_s": t2 - t1, "quality_s": t3 - t2}
        return result
