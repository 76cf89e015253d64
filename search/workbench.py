"""The workbench: one loaded model with what every use of it shares (its text windows, the
quantizer's calibration, pruning and student statistics, the prepared-variant cache), built
from strict SearchSettings. The trial runner is one (search.runner.TrialRunner); `pick`,
`front --measure` and distillation rebuild a run's workbench (`Workbench.from_run`) and apply
a recipe exactly as the search did (`build`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from llmpareto import models
from llmpareto.arch import Arch
from llmpareto.compress import VariantCache, apply
from llmpareto.models import load_model, model_bos, resolve_model
from llmpareto.placement import Placement, device_free_bytes, resolve
from llmpareto.recipe import Recipe
from llmpareto.rundir import RunDir
from llmpareto.search.settings import SearchSettings
from llmpareto.text import read_text, tokenize_windows
from llmpareto.units import format_bytes

_FROM_MODEL = object()  # bos: as the model's tokenizer (or GGUF) says
MIN_CACHE_BYTES = 256 * 2**20  # a cache is never cut below this (a few tensors' variants)


def fit_caches(dense: int, packed: int, room: int) -> tuple[int, int]:
    """Cache bounds (bytes) lowered in proportion so that together they take at most `room`
    bytes; unchanged when they fit, and never below MIN_CACHE_BYTES each (or their own size,
    if smaller: a cache turned off stays off)."""
    total = dense + packed
    if total <= room:
        return dense, packed
    share = max(room, 0) / total
    return tuple(min(c, max(int(c * share), MIN_CACHE_BYTES)) for c in (dense, packed))


@dataclass
class Built:
    """A model with a recipe applied, and what the exporters need next to it."""

    model: object
    tokenizer: object
    cache: object
    formats: dict[str, str | None]
    source: object
    bos: int | None = None  # the BOS the run's windows started with (None: none)


class Workbench:
    def __init__(self, settings: SearchSettings, placement: Placement | None = None,
                 bos=_FROM_MODEL, dense_bytes: int | None = None,
                 device_room: bool = True, memory_share: float = 1.0) -> None:
        self.settings = settings
        # the part of this host's memory the caches plan on: a Ray worker shares its node
        # with the other trials Ray runs there at once (placement.node_share)
        self.memory_share = memory_share
        # a device or dtype this machine lacks, or bad --text, fails before the slow load
        self.placement = placement or resolve(settings.torch_device, settings.torch_dtype)
        # the dtype decides the scores: recorded resolved, so a --resume, a worker or a Ray
        # trial scores in the same one wherever `auto` would resolve otherwise
        settings.torch_dtype = self.placement.dtype
        text = read_text(settings.text)
        self.source = resolve_model(settings.model, settings.allow_pickle)
        self.model, self.tokenizer = load_model(self.source, self.placement)
        self.arch = Arch.from_model(self.model)
        self.bos = model_bos(self.source, self.tokenizer, self.model) \
            if bos is _FROM_MODEL else bos
        self.windows = tokenize_windows(self.tokenizer, text, settings.window,
                                        settings.calib_tokens, settings.eval_tokens,
                                        bos=self.bos)
        dense, packed = self._fit_caches(
            settings.dequant_cache if dense_bytes is None else dense_bytes,
            settings.variant_cache)
        self.cache = VariantCache(self.model, self.arch, dense, packed,
                                  self._device_room() if device_room else 0)
        self.calibrate_s = self._set_quantizer()

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Workbench:
        """A run's workbench as its search had it (its own settings, read strictly from
        run.json), on the CPU in the dtype its trials ran in: variants are quantized from the
        same (e.g. bfloat16-rounded) weights, so an export holds the searched model's bytes;
        windows cut as its search cut them (a run from before BOS-first windows: no BOS)."""
        info = RunDir(Path(run_dir)).read_run_json()
        settings = SearchSettings.from_dict(info["settings"])
        dtype = (info.get("placement") or {}).get("dtype", "float32")
        bos = ((info.get("text") or {}).get("windows") or {}).get("bos_token_id")
        bench = cls(settings, Placement("cpu", dtype), bos=bos, dense_bytes=0,
                    device_room=False)
        if "sparsity" in str(settings.space):  # prune as the search did
            bench.set_pruning()
        return bench

    def _working_bytes(self) -> int:
        """Memory a forward pass and the base model's log-probabilities take beside the
        weights: logits, softmax and float64 copies of a batch, and the log-probs kept for
        the KL on each text the run measures."""
        s, vocab = self.settings, int(self.model.config.vocab_size)
        texts = 1 + bool(s.recover_steps and s.recover_guard != "none")  # eval text, guard
        return (6 * s.batch_size * s.window * vocab * 4
                + 8 * (s.eval_tokens + s.eval_text_tokens * texts) * vocab)

    def _device_room(self) -> int:
        """GPU memory packed codes may take: what is free now, less the dense cache, the
        working memory of a forward pass and a 10% margin (0 on the CPU)."""
        free = device_free_bytes(self.placement)
        if free is None:
            return 0
        return max(0, int(0.9 * free) - self.settings.dequant_cache - self._working_bytes())

    def _fit_caches(self, dense: int, packed: int) -> tuple[int, int]:
        """The variant caches' bounds, lowered in proportion when they would not fit the host
        memory available now (the model is loaded already) beside a forward pass, with a
        note: an LRU bound never changes a score (a dropped variant is made again,
        identically), an out-of-memory kill loses the run's time. On a GPU the dense cache
        lives there (`_device_room`) and only the packed codes are held on the host."""
        free = models.available_memory_bytes()
        if free is None:
            return dense, packed
        host_dense = 0 if self.placement.is_cuda else dense
        room = int(0.8 * free * self.memory_share) - self._working_bytes()
        fit_dense, fit_packed = fit_caches(host_dense, packed, room)
        if (fit_dense, fit_packed) == (host_dense, packed):
            return dense, packed
        asked = (f"--dequant-cache {format_bytes(dense)} and " if host_dense else "") + \
            f"--variant-cache {format_bytes(packed)}"
        kept = (f"{format_bytes(fit_dense)} and " if host_dense else "") + format_bytes(fit_packed)
        part = "" if self.memory_share >= 1 else \
            f"this worker's share ({self.memory_share:.3g}: the trials run at once here) of "
        print(f"llmpareto: note: {asked} would not fit {part}the {format_bytes(free)} of memory "
              "available (MemAvailable in /proc/meminfo, less a forward pass and a 20% "
              f"margin): this run keeps at most {kept}; variants dropped are made again, "
              "identically (slower, same scores)", file=sys.stderr)
        return (fit_dense if host_dense else dense), fit_packed

    def _set_quantizer(self) -> float:
        """The run's quantizer (--quantizer) with its calibration (compress.quantizers)."""
        from llmpareto.compress.quantizers import setup_quantizer

        s = self.settings
        return setup_quantizer(
            self.cache, self.windows.calib, self.windows.sha256, quantizer=s.quantizer,
            imatrix=s.imatrix, batch_size=s.batch_size, window=s.window, damp=s.gptq_damp,
            act_order=s.gptq_act_order, disk_cache=s.disk_cache)

    def set_pruning(self) -> None:
        """Calibration statistics of the base model for the pruning method (Wanda: each input
        column's norm; SparseGPT: full x^T x, cols^2 float64 a module)."""
        from llmpareto.compress.calibration import pruning_stats

        method = self.settings.sparsity_method
        self.cache.set_pruning(method, pruning_stats(
            self.model, [t.fqn for t in self.arch.linears], method, self.windows.calib,
            self.settings.batch_size))

    def set_importance(self) -> None:
        """The input norms that decide a student's MLP channels and attention groups, on the
        base model (once)."""
        from llmpareto.compress.calibration import student_importance

        apply(self.model, Recipe(), self.cache)  # on the base model
        self.cache.set_importance(student_importance(
            self.model, self.arch, self.windows.calib, self.settings.batch_size,
            self.cache.input_stats))

    def build(self, recipe: Recipe) -> Built:
        """`recipe` applied to the model exactly as the search applies it."""
        narrows = {"mlp_ratio", "heads"} & {k for k, v in recipe.structure.items()
                                            if v is not None}
        if narrows and not self.cache.importance:  # rank channels and groups as the search
            self.set_importance()
        formats = apply(self.model, recipe, self.cache)
        return Built(self.model, self.tokenizer, self.cache, formats, self.source, self.bos)
