"""Blockwise local distillation (Puzzle's BLD, Bercovich et al. 2024): each block of a student is
trained on its own, fed the teacher's hidden state where the block starts, towards the teacher's
hidden state where the next kept block starts. A kept block that stands for a span of dropped
teacher blocks learns the whole span; a narrowed or pruned block learns what the full block
gave. Blocks never see each other's errors, so each trains alone on cached teacher states: a
step costs one block's forward and backward on a batch, not the student's and the teacher's
whole models (end-to-end distillation, compress/distill.py, is the next, dearer rung).

Pure tensor functions: blocks (any nn.Module called like a Llama decoder layer), their
captured inputs (compress.reconstruct.block_inputs) and target hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmpareto.compress.reconstruct import BlockInput, _batches, _hidden, _output, _stacked


@dataclass
class LocalReport:
    """One block's output mean squared error against its target on the judging windows (the
    held-out ones when there are): at the start, and for the weights kept (the best checked,
    the start included, so never above `mse_start`)."""

    mse_start: float
    mse: float
    steps: int
    kept_step: int  # 0: the start was best


def spans(kept: Sequence[int], n_blocks: int) -> list[tuple[int, int]]:
    """For each kept teacher block, in order: (the teacher block whose input it is fed, the
    teacher block whose input it must give; `n_blocks` for the stack's output)."""
    kept = list(kept)
    if sorted(set(kept)) != kept or not kept or kept[0] < 0 or kept[-1] >= n_blocks:
        raise ValueError(f"kept blocks {kept} must be distinct, ascending, in 0..{n_blocks - 1}")
    return [(k, kept[j + 1] if j + 1 < len(kept) else n_blocks) for j, k in enumerate(kept)]


def distill_block(block: nn.Module, inputs: Sequence[BlockInput],
                  targets: Sequence[torch.Tensor], steps: int, lr: float = 1e-2,
                  batch: int = 4, seed: int = 0, holdout: int = 0,
                  masks: dict[str, torch.Tensor] | None = None) -> LocalReport:
    """Train `block`'s parameters that require grad, in place, with Adam on the mean squared
    error between `block(inputs[i])` and `targets[i]`; `lr` is relative: each tensor's step
    size is `lr` times its root mean square (a 1% step suits a random tiny model and a trained
    one alike, whose weights differ tenfold in scale), decaying linearly to 0. The last `holdout` windows are never
    learned on; they judge, every tenth of the steps, which weights to keep (early stopping:
    the start counts, so the block never ends worse there). `masks`: parameter name -> bool
    tensor of the entries that may be nonzero (a pruned weight's zeros stay zeros)."""
    if not 0 <= holdout < len(inputs) or len(targets) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs, {len(targets)} targets, holdout {holdout}: "
                         "one target per input and some inputs to learn on")
    train = {n: p for n, p in block.named_parameters() if p.requires_grad}
    # weights made under inference mode (a cache's variants) cannot join a graph: copies
    fixed = {n: p.detach().clone() for n, p in block.named_parameters()
             if n not in train and p.is_inference()}
    masks = {n: m.to(train[n].device) for n, m in (masks or {}).items() if n in train}

    def loss_on(idx: Sequence[int]) -> torch.Tensor:
        total = 0.0
        for part in _batches(inputs, idx):
            a, k = _stacked(inputs, part)
            out = _output(torch.func.functional_call(block, {**fixed, **train}, a, k)).float()
            want = torch.cat([targets[i] for i in part]).to(out.device, torch.float32)
            total = total + torch.mean((out - want) ** 2) * len(part)
        return total / len(idx)

    learn = list(range(len(inputs) - holdout))
    judge = list(range(len(inputs) - holdout, len(inputs))) if holdout else learn
    with torch.no_grad():
        best = start = float(loss_on(judge))
    best_w = {n: p.detach().clone() for n, p in train.items()}
    kept_step = 0
    opt = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().float().pow(2).mean()
                                                                 .sqrt().clamp(min=1e-8))}
                            for p in train.values()])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = [learn[i] for i in torch.randperm(len(learn), generator=gen)[:batch].tolist()]
        opt.zero_grad(set_to_none=True)
        loss_on(idx).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for n, m in masks.items():
                train[n].mul_(m)
            if (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
                now = float(loss_on(judge))
                if now < best:
                    best, kept_step = now, step + 1
                    best_w = {n: p.detach().clone() for n, p in train.items()}
    with torch.no_grad():
        for n, p in train.items():
            p.copy_(best_w[n])
    return LocalReport(start, best, steps, kept_step)


def distill_blocks(blocks: Sequence[nn.Module], kept: Sequence[int],
                   teacher_states: Sequence[Sequence[BlockInput]], steps: int,
                   lr: float = 1e-2, batch: int = 4, seed: int = 0, holdout: int = 0,
                   masks: Sequence[dict[str, torch.Tensor]] | None = None,
                   progress=None) -> list[LocalReport]:
    """Every student block in turn (`blocks[j]` stands for teacher block `kept[j]`).
    `teacher_states[w]`: for window w, the (args, kwargs) of each teacher block's call and, last,
    the stack's output (`block_inputs(teacher_blocks, run)`), so `len == n_blocks + 1`."""
    n_blocks = len(teacher_states[0]) - 1
    reports = []
    for j, (block, (src, dst)) in enumerate(zip(blocks, spans(kept, n_blocks), strict=True)):
        reports.append(distill_block(
            block, [w[src] for w in teacher_states],
            [_hidden(w[dst]).detach() for w in teacher_states], steps, lr=lr, batch=batch,
            seed=seed + j, holdout=holdout, masks=masks[j] if masks is not None else None))
        if progress is not None:
            progress(j)
    return reports
