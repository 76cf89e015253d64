"""Calibration statistics of the base model's linear inputs, gathered once per run with forward
hooks (`InputStats` per module): what Wanda and SparseGPT prune from."""

from __future__ import annotations

import numpy as np
import torch

from llmpareto.compress.prune import InputStats


@torch.inference_mode()
def collect_input_stats(model: torch.nn.Module, windows: np.ndarray, fqns: list[str],
                        diag_only: bool = False, batch_size: int = 4) -> dict[str, InputStats]:
    """Forward the calibration windows through the (base) model and accumulate, for each linear
    in `fqns`, its inputs' x^T x (or only its diagonal: cols floats, enough for Wanda).
    Memory: sum of cols^2 float64 over `fqns` (full) or sum of cols (diagonal)."""
    stats, hooks = {}, []
    for fqn in fqns:
        mod = model.get_submodule(fqn)
        stats[fqn] = InputStats.empty(mod.in_features, diag_only)
        hooks.append(mod.register_forward_hook(
            lambda m, args, out, s=stats[fqn]: s.add(args[0])))
    try:
        for i in range(0, len(windows), batch_size):
            model(input_ids=torch.from_numpy(windows[i:i + batch_size]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return stats


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
