"""Restructuring into real smaller models (a student of the base model): the blocks, MLP
channels and attention groups a recipe's `structure` keeps, chosen by importance on the base
model's calibration text, as index tensors; slicing a weight by them is a pure function.

- depth, `structure.layers`: the kept block indices (a student space keeps the blocks of
  highest Block Influence, 1 - cos(block input, block output), ShortGPT's measure);
- MLP width, `structure.mlp_ratio` in (0, 1]: one intermediate width for every block (every
  runtime takes it) or one per kept block (llama.cpp's `deci` architecture runs it), a
  multiple of MLP_ALIGN; each block keeps its channels of largest input norm into down_proj
  (activation importance, as Minitron);
- attention, `structure.heads`: KV heads kept, for every block or per kept block, each with
  all its query heads (whole grouped-query groups); each block keeps the groups of largest
  o_proj input norm.
"""

from __future__ import annotations

import numpy as np
import torch

from llmpareto.errors import UserError
from llmpareto.placement import ids_on
from llmpareto.structure import MLP_ALIGN, check_structure, mlp_width, per_block


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in increasing index order (ties: lower index)."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return torch.sort(order).values


def group_scores(o_proj_col_norm: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Importance of each KV group: the squared input norms of o_proj over all its query
    heads' columns (the group's share of the attention output)."""
    return (o_proj_col_norm.double() ** 2).reshape(n_kv_heads, -1).sum(1)


def head_rows(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """Rows (or columns) of the kept groups when each group owns `per_group` consecutive ones."""
    return (groups[:, None] * per_group + torch.arange(per_group)[None, :]).reshape(-1)


def slice_weight(w: torch.Tensor, rows: torch.Tensor | None,
                 cols: torch.Tensor | None) -> torch.Tensor:
    """The kept rows and columns of a (rows x cols) weight, contiguous."""
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    return w.contiguous()


@torch.inference_mode()
def block_influence(model: torch.nn.Module, windows: np.ndarray,
                    batch_size: int = 4) -> list[float]:
    """Each block's Block Influence on calibration text: mean over tokens of
    1 - cos(hidden state in, hidden state out). Low: the block changes little, drop it first."""
    layers = list(model.model.layers)
    sums = [0.0] * len(layers)
    count = 0
    hooks = []
    for i, block in enumerate(layers):
        def hook(mod, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            sums[i] += float((1 - cos).sum())
        hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        for s in range(0, len(windows), batch_size):
            batch = ids_on(model, windows[s:s + batch_size])
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return [v / max(count, 1) for v in sums]


def keep_blocks(influence: list[float], n: int) -> list[int]:
    """The n blocks of highest influence, in order."""
    if not 1 <= n <= len(influence):
        raise UserError(f"a student keeps 1..{len(influence)} blocks; got {n}")
    return sorted(top_sorted(torch.tensor(influence), n).tolist())


def slices_for(structure: dict, shapes: dict[str, tuple[int, int]], kinds: dict[str, str],
               layers: dict[str, int], n_kv_heads: int, head_dim: int,
               importance: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """fqn -> (key, rows, cols) for every block projection a structure narrows; `importance`
    holds each block's down_proj and o_proj input column norms (by their fqn). A cut given per
    kept block (a list in the order of `structure["layers"]`) narrows each block by its own."""
    out: dict[str, tuple] = {}
    n = 1 + max(layers.values(), default=-1)
    ratios = per_block(structure, "mlp_ratio", n, None)
    heads_of = per_block(structure, "heads", n, None)
    by_layer: dict[int, dict[str, str]] = {}
    for fqn, kind in kinds.items():
        by_layer.setdefault(layers[fqn], {})[kind] = fqn
    for layer, mods in by_layer.items():
        ratio, heads = ratios.get(layer), heads_of.get(layer)
        down = mods.get("mlp.down_proj")
        if ratio is not None and ratio < 1 and down is not None:
            inter = shapes[down][1]
            k = mlp_width(inter, ratio)
            if k < inter:
                keep = top_sorted(_need(importance, down), k)
                key = ("mlp", k)
                for kind in ("mlp.gate_proj", "mlp.up_proj"):
                    if kind in mods:
                        out[mods[kind]] = (key, keep, None)
                if "mlp.gate_up_proj" in mods:  # fused (Phi-3): gate rows, then up rows
                    out[mods["mlp.gate_up_proj"]] = (key, torch.cat([keep, keep + inter]), None)
                out[down] = (key, None, keep)
        o = mods.get("self_attn.o_proj")
        if heads is not None and heads < n_kv_heads and o is not None:
            groups = top_sorted(group_scores(_need(importance, o), n_kv_heads), heads)
            q_per_group = shapes[o][1] // n_kv_heads
            key = ("heads", heads)
            q_rows, kv_rows = head_rows(groups, q_per_group), head_rows(groups, head_dim)
            for kind, rows in (("self_attn.q_proj", q_rows), ("self_attn.k_proj", kv_rows),
                               ("self_attn.v_proj", kv_rows)):
                if kind in mods:
                    out[mods[kind]] = (key, rows, None)
            out[o] = (key, None, q_rows)
    return out


def _need(importance: dict[str, torch.Tensor], fqn: str) -> torch.Tensor:
    if fqn not in importance:
        raise UserError(f"narrowing {fqn} needs calibration activations: set --calib-tokens > 0")
    return importance[fqn]


def narrowed_shape(rows: int, cols: int, sl: tuple | None) -> tuple[int, int]:
    if sl is None:
        return rows, cols
    _, r, c = sl
    return (rows if r is None else len(r)), (cols if c is None else len(c))


__all__ = ["MLP_ALIGN", "block_influence", "check_structure", "group_scores", "head_rows",
           "keep_blocks", "mlp_width", "narrowed_shape", "slice_weight", "slices_for",
           "top_sorted"]
