"""Least-squares refit of a student's output projections, in closed form (seconds, no steps):
each kept block, fed the student's own hidden state (the blocks before it already refit), gets
the attention output projection that brings its residual after attention closest to the base
block's, then the MLP down-projection that brings its output closest to the base model's hidden
state where the next kept block starts. For a narrowed MLP or fewer attention groups this is
the channel-pruning reconstruction of He et al. 2017 (which AMC used after each cut); for a
span of dropped blocks it is ReplaceMe's (2025) training-free linear patch, here learned as the
whole down-projection rather than a factor.

The block output is `rest + a @ W.T` (`a`: the projection's input, `rest`: everything else
the block adds) exactly when the projection's output enters the residual stream unnormalized
(Llama-style blocks; a projection with a norm after it is left as it is). A ridge towards the
current weights keeps the solve sound with fewer tokens than channels; its strength is chosen
per solve on held-out windows, where the current weights compete too, so no solve leaves a
larger held-out error than it found.

Pure tensor functions: blocks called like Llama decoder layers, their captured inputs
(compress.reconstruct.block_inputs) and target hidden states.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmpareto.compress.reconstruct import BlockInput, _hidden, _next, _output

# ridge strengths tried, relative to the mean diagonal of the Gram matrix a.T @ a
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LINEAR_RTOL = 1e-3  # output == rest + down(a) within this (relative): the MLP adds linearly


@dataclass
class RefitReport:
    """One block's output mean squared error against its target on the judging windows (the
    held-out ones when there are), before and after; `ridge` the relative strength chosen
    (None: the current weights were best, or the block is not linear in its down-projection)."""

    mse_start: float
    mse: float
    ridge: float | None
    attention: RefitReport | None = None  # the attention output projection's, when solved


def _parts(block: nn.Module, inputs: Sequence[BlockInput], proj_name: str,
           zero_also: Sequence[str] = ()) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Per window, the projection's input `a` [tokens, channels] and `rest` (the block's output
    with that projection's output zeroed), both float64, with the weights `zero_also` zeroed in
    both (the down-projection, to read the residual after attention); None when the output is
    not `rest + proj(a)` (a norm after the projection)."""
    proj = block.get_submodule(proj_name)
    also = {f"{n}.weight": torch.zeros_like(block.get_submodule(n).weight) for n in zero_also}
    zero = {**also, f"{proj_name}.weight": torch.zeros_like(proj.weight)}
    acts, rests = [], []
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    h = proj.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                seen.clear()
                full = _output(torch.func.functional_call(block, also, args, kwargs))
                a, y = seen[0]
                rest = _output(torch.func.functional_call(block, zero, args, kwargs))
                err = (full.double() - rest.double() - y.double()).abs().max()
                if err > LINEAR_RTOL * full.double().abs().max().clamp(min=1e-12):
                    return None
                acts.append(a.reshape(-1, a.shape[-1]).double())
                rests.append(rest.reshape(-1, rest.shape[-1]).double())
    finally:
        h.remove()
    return acts, rests


def after_attention(block: nn.Module, inputs: Sequence[BlockInput],
                    down: str = "mlp.down_proj") -> list[torch.Tensor]:
    """Per window, the block's residual stream after its attention (its output with the MLP's
    down-projection zeroed, in a Llama-style block): the target of a student block's attention
    output projection."""
    zero = {f"{down}.weight": torch.zeros_like(block.get_submodule(down).weight)}
    with torch.no_grad():
        return [_output(torch.func.functional_call(block, zero, a, k)).detach()
                for a, k in inputs]


def _float(x):
    """`x` (a block's inputs: tensors in tuples, lists and dicts) with its half-precision
    floating tensors as float32."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.element_size() < 4 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_float(v) for v in x)
    if isinstance(x, dict):
        return {k: _float(v) for k, v in x.items()}
    return x


def _mse(acts, rests, targets, wt: torch.Tensor, idx: Sequence[int]) -> float:
    total = sum(float(((rests[i] + acts[i] @ wt - targets[i]) ** 2).sum()) for i in idx)
    return total / sum(targets[i].numel() for i in idx)


def _solve(block: nn.Module, inputs: Sequence[BlockInput], targets: Sequence[torch.Tensor],
           proj_name: str, holdout: int, zero_also: Sequence[str] = ()) -> RefitReport:
    """Set `block`'s `proj_name` weight, in place, to the ridge least-squares solution of
    `block(inputs[i]) ~= targets[i]` (with `zero_also` zeroed) over the learning windows."""
    proj = block.get_submodule(proj_name)
    # bfloat16's rounding of the residual stream would hide (or fake) the projection's
    # linearity and swamp the solve: a half-precision block is measured as a float32 copy
    low = proj.weight.dtype not in (torch.float32, torch.float64)
    parts = _parts(copy.deepcopy(block).float(), [_float(x) for x in inputs], proj_name,
                   zero_also) if low else _parts(block, inputs, proj_name, zero_also)
    w0t = proj.weight.detach().double().T  # [channels, hidden]
    if parts is None:
        return RefitReport(float("nan"), float("nan"), None)
    acts, rests = parts
    tgt = [t.reshape(-1, t.shape[-1]).to(acts[0].device, torch.float64) for t in targets]
    learn = range(len(inputs) - holdout)
    judge = range(len(inputs) - holdout, len(inputs)) if holdout else learn
    gram = sum(acts[i].T @ acts[i] for i in learn)
    cross = sum(acts[i].T @ (tgt[i] - rests[i]) for i in learn)
    scale = float(torch.diagonal(gram).mean().clamp(min=1e-30))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    start = best = _mse(acts, rests, tgt, w0t, judge)
    best_wt, ridge = w0t, None
    for r in RIDGES:
        wt = torch.linalg.solve(gram + r * scale * eye, cross + r * scale * w0t)
        got = _mse(acts, rests, tgt, wt, judge)
        if got < best:
            best, best_wt, ridge = got, wt, r
    with torch.no_grad():
        proj.weight.copy_(best_wt.T.to(proj.weight.dtype))
    return RefitReport(start, best, ridge)


def refit_block(block: nn.Module, inputs: Sequence[BlockInput], targets: Sequence[torch.Tensor],
                down: str = "mlp.down_proj", holdout: int = 0,
                attn: str = "self_attn.o_proj",
                attn_targets: Sequence[torch.Tensor] | None = None) -> RefitReport:
    """Set `block`'s `down` weight, in place, to the ridge least-squares solution of
    `block(inputs[i]) ~= targets[i]` over the first `len(inputs) - holdout` windows; the last
    `holdout` windows (all of them when 0) choose among RIDGES and the current weight. With
    `attn_targets` (the residual after attention wanted, per window), the attention's output
    projection `attn` is solved first the same way (He et al.'s reconstruction after a cut of
    attention groups); the report is the down-projection's, `attention` the first solve's."""
    if not 0 <= holdout < len(inputs) or len(targets) != len(inputs) or (
            attn_targets is not None and len(attn_targets) != len(inputs)):
        raise ValueError(f"{len(inputs)} inputs, {len(targets)} targets, holdout {holdout}: "
                         "one target per input and some inputs to learn on")
    first = None if attn_targets is None else _solve(block, inputs, attn_targets, attn, holdout,
                                                     zero_also=(down,))
    got = _solve(block, inputs, targets, down, holdout)
    got.attention = first
    return got


def refit_blocks(blocks: Sequence[nn.Module], first_inputs: Sequence[BlockInput],
                 targets: Sequence[Sequence[torch.Tensor]], down: str = "mlp.down_proj",
                 holdout: int = 0, progress: Callable[[int], None] | None = None,
                 attn_targets: Sequence[Sequence[torch.Tensor]] | None = None,
                 attn: str = "self_attn.o_proj") -> list[RefitReport]:
    """Every block in turn, on the student's own stream: block j is fed what the blocks before
    it give (already refit) and fit to `targets[w][j]` (the base model's hidden state where the
    next kept block starts, for window w), its attention output first to `attn_targets[w][j]`
    when given. `first_inputs`: block 0's inputs, one per window."""
    inputs, reports = list(first_inputs), []
    for j, block in enumerate(blocks):
        reports.append(refit_block(
            block, inputs, [t[j] for t in targets], down, holdout, attn,
            None if attn_targets is None else [t[j] for t in attn_targets]))
        inputs = _next(block, inputs)
        if progress is not None:
            progress(j)
    return reports


def hidden_targets(teacher_states: Sequence[Sequence[BlockInput]], dsts: Sequence[int],
                   ) -> list[list[torch.Tensor]]:
    """Per window, the teacher's hidden state at each of `dsts` (teacher block indices whose
    input a student block must give; the stack's length for its output)."""
    return [[_hidden(w[d]).detach() for d in dsts] for w in teacher_states]
