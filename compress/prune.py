"""Pruning as pure tensor functions: a weight (rows x cols, torch Linear layout) and calibration
statistics in, a pruned weight out. Methods: magnitude, Wanda, SparseGPT; patterns
"unstructured" (a ratio) and "N:M" (N weights kept in every M consecutive ones of a row).

Statistics come from the *base* model's calibration activations (`InputStats`), so a module's
pruned variant never depends on what other modules chose and can be cached once per run.
Sequential pruning (SparseGPT's paper, llm-compressor) instead feeds each block the already
pruned blocks' outputs; that is slightly better at high sparsity but makes every variant depend
on every earlier choice, which a per-module search cannot cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpareto.errors import UserError
from llmpareto.recipe import parse_pattern


@dataclass
class InputStats:
    """What pruning needs of a linear's inputs x (tokens x cols) on calibration text: the sum of
    x x^T over tokens (SparseGPT's Hessian, up to 2/n) and the token count; Wanda uses its
    diagonal (each input column's squared norm)."""

    xtx: torch.Tensor  # (cols, cols) float64, sum over tokens of x^T x
    tokens: int

    @classmethod
    def empty(cls, cols: int, diag_only: bool = False) -> InputStats:
        shape = (cols,) if diag_only else (cols, cols)
        return cls(torch.zeros(shape, dtype=torch.float64), 0)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # summed where x is (a GPU), kept on the host
        self.xtx += ((x * x).sum(0) if self.xtx.dim() == 1 else x.T @ x).to(self.xtx.device)
        self.tokens += x.shape[0]

    @property
    def col_norm(self) -> torch.Tensor:
        """||x_j||_2 over calibration tokens for each input column j (Wanda's statistic)."""
        d = self.xtx if self.xtx.dim() == 1 else torch.diagonal(self.xtx)
        return d.clamp_min(0).sqrt()


def _pruned_counts(n_rows: int, per_row: int, total_pruned: int) -> torch.Tensor:
    """Pruned count per row so that the module's total is exactly `total_pruned`."""
    base, extra = divmod(total_pruned, n_rows)
    counts = torch.full((n_rows,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts.clamp_max(per_row)


def _prune_lowest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask (True = pruned) of the lowest scores in each row; exactly
    round(sparsity * numel) pruned in the whole tensor (rows differ by at most one)."""
    rows, cols = score.shape
    return _rank_lowest(score, _pruned_counts(rows, cols, round(sparsity * rows * cols)))


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True = pruned: in every m consecutive weights of a row, the m - n lowest scores."""
    rows, cols = score.shape
    if cols % m:
        raise UserError(f"pattern {n}:{m} needs rows whose length is a multiple of {m}; this "
                        f"module has {cols} columns")
    groups = score.reshape(rows, cols // m, m)
    low = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, low, True)
    return mask.reshape(rows, cols)


def _mask(score: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    nm = parse_pattern(pattern)
    return _prune_lowest(score, sparsity) if nm is None else nm_mask(score, *nm)


def magnitude(w: torch.Tensor, sparsity: float, pattern: str = "unstructured",
              stats: InputStats | None = None) -> torch.Tensor:
    """Zero the smallest |w| (per row); needs no calibration text."""
    return w.masked_fill(_mask(w.abs().float(), sparsity, pattern), 0)


def wanda(w: torch.Tensor, sparsity: float, pattern: str = "unstructured",
          stats: InputStats | None = None) -> torch.Tensor:
    """Zero the smallest |w_ij| * ||x_j|| per output row (Sun et al. 2023, "Wanda")."""
    if stats is None:
        raise UserError("wanda needs calibration activations: set --calib-tokens > 0")
    score = w.abs().double() * stats.col_norm[None, :]
    return w.masked_fill(_mask(score, sparsity, pattern), 0)


def hessian_inverse(xtx: torch.Tensor, damp: float = 0.01,
                    perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor U of (H + damp x mean(diag H) x I)^-1 (H^-1 = U^T U), H = `xtx`
    with its columns taken in the order `perm` (None: as they are), and the mask of dead
    columns (no activation, in xtx's own order): their H diagonal is set to 1 so the factor
    exists, and the caller zeroes their weights (SparseGPT's and GPTQ's reference code)."""
    H = xtx.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    if perm is not None:
        H = H[perm][:, perm]
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return Hinv, dead


def sparsegpt(w: torch.Tensor, sparsity: float, pattern: str = "unstructured",
              stats: InputStats | None = None, blocksize: int = 128,
              damp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): prune column block by column block with the OBS
    saliency w^2 / [H^-1]_jj^2 and update the not-yet-pruned columns to compensate, H the
    inputs' x^T x with `damp` x mean(diag) added. The mask of each block is chosen when the
    block starts (N:M: every m columns), so each row keeps exactly its share."""
    if stats is None or stats.xtx.dim() != 2:
        raise UserError("sparsegpt needs calibration activations (full x^T x): set "
                        "--calib-tokens > 0")
    nm = parse_pattern(pattern)
    rows, cols = w.shape
    W = w.double().clone()
    Hinv, dead = hessian_inverse(stats.xtx, damp)
    W[:, dead] = 0.0
    counts = _pruned_counts(rows, cols, round(sparsity * rows * cols)) if nm is None else None
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        d = torch.diagonal(Hinv1)
        if nm is None:  # this block's share of each row's pruned count
            share = _block_share(counts, i1, i2, cols)
            mask1 = _rank_lowest(W1 ** 2 / d[None, :] ** 2, share)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                mask1[:, i:i + nm[1]] = nm_mask(sal, *nm)
            q = W1[:, i].masked_fill(mask1[:, i], 0.0)
            e = (W1[:, i] - q) / d[i]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            err[:, i] = e
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return W.masked_fill(pruned, 0.0).to(w.dtype)


def _block_share(counts: torch.Tensor, i1: int, i2: int, cols: int) -> torch.Tensor:
    """Each row's pruned count within columns i1:i2, so the shares over all blocks add up to
    the row's count exactly (cumulative rounding)."""
    return (counts * i2) // cols - (counts * i1) // cols


def _rank_lowest(score: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(score, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1]).expand_as(order))
    return rank < per_row[:, None]


def outlier_ratio(scores: list, m: float = 5.0) -> float:
    """OWL's layerwise outlier distribution (Yin et al. 2023): the fraction of the scores
    (|W| x ||x||, Wanda's metric, over all the group's tensors) above m times their mean.
    `scores` holds tensors, or functions that make one: then each is made twice (once for the
    mean, once for the count) and only one is held at a time (an 8B group would not fit)."""
    def each():
        for s in scores:
            yield (s() if callable(s) else s).reshape(-1).double()

    total = count = 0
    for x in each():
        total, count = total + float(x.sum()), count + x.numel()
    cut = m * (total / count)
    return sum(float((x > cut).sum()) for x in each()) / count


def owl_levels(ratios: list[float], sizes: list[int], target: float,
               lam: float = 0.08) -> list[float]:
    """OWL's allocation: density rises linearly with the outlier ratio over a band of 2 x lam,
    shifted so the size-weighted mean sparsity is `target` (OWL's code shifts the plain mean
    of equal-size blocks; groups here may differ in size)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    span = float(r.max() - r.min())
    if span == 0:
        return [float(target)] * len(ratios)
    d = (r - r.min()) / span * 2 * lam
    density = d - float((d * w).sum() / w.sum()) + (1 - target)
    return [float(1 - x) for x in density]


PRUNERS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}


def prune(w: torch.Tensor, method: str, sparsity: float, pattern: str = "unstructured",
          stats: InputStats | None = None) -> torch.Tensor:
    """Registry entry point: `method` in PRUNERS; sparsity in [0, 1) (ignored for N:M)."""
    if method not in PRUNERS:
        raise UserError(f"sparsity method {method!r}; available: {', '.join(PRUNERS)}")
    if not 0 <= sparsity < 1:
        raise UserError(f"sparsity level {sparsity!r} is outside [0, 1)")
    if parse_pattern(pattern) is None and sparsity == 0:
        return w.clone()
    return PRUNERS[method](w, sparsity, pattern, stats)
