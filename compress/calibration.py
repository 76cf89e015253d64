"""Calibration statistics of the base model's linear inputs, gathered once per run with forward
hooks (`InputStats` per module): what Wanda and SparseGPT prune from."""

from __future__ import annotations

import numpy as np
import torch

from llmpareto.compress.prune import InputStats
from llmpareto.placement import ids_on


@torch.inference_mode()
def collect_input_stats(model: torch.nn.Module, windows: np.ndarray, fqns: list[str],
                        diag_only: bool = False, batch_size: int = 4) -> dict[str, InputStats]:
    """Forward the calibration windows through the (base) model and accumulate, for each linear
    in `fqns`, its inputs' x^T x (or only its diagonal: cols floats, enough for Wanda).
    Memory: sum of cols^2 float64 over `fqns` (full) or sum of cols (diagonal)."""
    stats: dict[str, InputStats] = {}
    hooks = _hook(model, fqns, diag_only, stats)
    try:
        for i in range(0, len(windows), batch_size):
            model(input_ids=ids_on(model, windows[i:i + batch_size]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _hook(model: torch.nn.Module, fqns: list[str], diag_only: bool,
          stats: dict[str, InputStats]) -> list:
    """Forward hooks that add each linear's inputs to a new InputStats in `stats`."""
    hooks = []
    for fqn in fqns:
        mod = model.get_submodule(fqn)
        stats[fqn] = InputStats.empty(mod.in_features, diag_only)
        hooks.append(mod.register_forward_hook(
            lambda m, args, out, s=stats[fqn]: s.add(args[0])))
    return hooks


def pruning_stats(model: torch.nn.Module, fqns: list[str], method: str, windows: np.ndarray,
                  batch_size: int) -> dict[str, InputStats]:
    """The statistics `method` prunes from (none for magnitude), on the base model. The search
    and `pick` call this with the same windows and batch size, so both prune alike."""
    from llmpareto.recipe import NEEDS_CALIBRATION

    if method not in NEEDS_CALIBRATION:
        return {}
    return collect_input_stats(model, windows, fqns, diag_only=method == "wanda",
                               batch_size=batch_size)


def student_importance(model: torch.nn.Module, arch, windows: np.ndarray, batch_size: int,
                       stats: dict[str, InputStats] | None = None) -> dict[str, torch.Tensor]:
    """Input column norms of every down_proj (MLP channels) and o_proj (attention heads) on
    the base model's calibration text; reuses pruning statistics already gathered."""
    fqns = [t.fqn for t in arch.linears if t.kind in ("mlp.down_proj", "self_attn.o_proj")]
    stats = dict(stats or {})
    missing = [f for f in fqns if f not in stats]
    if missing:
        if len(windows) == 0:
            return {}
        stats.update(collect_input_stats(model, windows, missing, diag_only=True,
                                         batch_size=batch_size))
    return {f: stats[f].col_norm for f in fqns}


# Linears of one block that read the same input (Llama-family): one statistic serves them all.
_SHARED_INPUT = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in",
                 "self_attn.v_proj": "attn_in", "mlp.gate_proj": "mlp_in",
                 "mlp.up_proj": "mlp_in"}


@torch.inference_mode()
def quantizer_stats(model: torch.nn.Module, arch, windows: np.ndarray, batch_size: int,
                    full: bool) -> dict[str, InputStats]:
    """Input statistics of every searched tensor for a calibrated quantizer: x^T x (`full`,
    GPTQ) or its diagonal (the importance matrix), one object per distinct input (q/k/v and
    gate/up share theirs), gathered block by block (`blockwise_stats`). The output head's
    input is the embedding's statistic when the two are tied, as in llama-imatrix, where the
    tied head's matmul reads token_embd.weight."""
    groups: dict[tuple, list[str]] = {}
    for t in arch.linears:
        groups.setdefault((t.layer, _SHARED_INPUT.get(t.kind, t.fqn)), []).append(t.fqn)
    head = arch.lm_head.fqn if arch.lm_head is not None else None
    head_module = model.get_output_embeddings()
    stats = blockwise_stats(model, windows, batch_size,
                            [fqns[0] for fqns in groups.values()], diag_only=not full)
    out = {fqn: stats[fqns[0]] for fqns in groups.values() for fqn in fqns}
    if head_module is not None and len(windows):
        s = InputStats.empty(head_module.in_features, not full)
        h = head_module.register_forward_hook(lambda m, args, o: s.add(args[0]))
        try:
            for i in range(0, len(windows), batch_size):
                model(input_ids=ids_on(model, windows[i:i + batch_size]), use_cache=False)
        finally:
            h.remove()
        out[head or arch.embedding.fqn] = s
    return out


class _Stop(Exception):
    pass


@torch.inference_mode()
def blockwise_stats(model: torch.nn.Module, windows: np.ndarray, batch_size: int,
                    fqns: list[str], diag_only: bool) -> dict[str, InputStats]:
    """`collect_input_stats` one transformer block at a time: the inputs of block 0 are caught
    once, then each block runs on the cached hidden states with hooks on its own linears only,
    so activation memory is one block's and a caller could drop a block's statistics before the
    next. Falls back to one whole-model pass for models without a `model.layers` list."""
    layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
    if not layers or len(windows) == 0:
        return collect_input_stats(model, windows, fqns, diag_only, batch_size)
    caught: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=ids_on(model, windows[i:i + batch_size]), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    stats: dict[str, InputStats] = {}
    for layer in layers:
        hooks = _hook(model, [n for n in fqns if _owner(model, n, layer) is not None],
                      diag_only, stats)
        try:
            for j, (args, kwargs) in enumerate(caught):
                out = layer(*args, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
                if args:
                    caught[j] = ((hidden, *args[1:]), kwargs)
                else:
                    caught[j] = ((), {**kwargs, "hidden_states": hidden})
        finally:
            for h in hooks:
                h.remove()
    return stats


def _owner(model: torch.nn.Module, fqn: str, layer: torch.nn.Module):
    """The module `fqn` when it lies inside `layer`, else None."""
    mod = model.get_submodule(fqn)
    return mod if any(m is mod for m in layer.modules()) else None
