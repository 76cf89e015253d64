"""The codes of llama.cpp's 2-bit lattice i-quants (iq2_xxs, iq2_xs) apart from their scales:
read a packed tensor's per-group scale, codebook entry and signs (`lattice_read`), find the
nearest lattice point of other weights under those scales (`lattice_project`), and write its
codes into the same blocks, every scale kept (`lattice_pack`).

A block of 256 weights holds one float16 `d` and, per group of 8 weights, an index into a
codebook of 8-vectors with entries in {8, 25, 43} (`iq2xxs_grid`: 256 of them, `iq2xs_grid`:
512) and 7 sign bits, the 8th sign being their parity (an even number of minus signs,
`ksigns_iq2xs`); 4-bit sub-block scales `ls` give each weight `d * (0.5 + ls) * 0.25 * entry *
sign` (iq2_xxs: one ls per 32 weights, in the top bits of the signs word; iq2_xs: one per 16,
two to a byte after the codes). The layouts are ggml's (block_iq2_xxs, block_iq2_xs in
ggml-common.h); the codebooks and signs are read from the `gguf` package's own tables, and
`lattice_values` is checked bit for bit against ggml's dequantizer in tests/test_reconstruct.py.

Rounding onto a lattice is a nearest-codeword search, not an integer rounding: with the
scales fixed, the nearest point of a group `y` is the entry `g` minimising
`sum (|y| - s g)^2` plus, when `y` has an odd number of negative weights, the cheapest sign flip
`4 s min_j |y_j| g_j` (exact: the sign pattern must have even parity).
"""

from __future__ import annotations

import functools

import torch

# format -> (block bytes, codebook entries)
LATTICE_CODES = {"iq2_xxs": (66, 256), "iq2_xs": (74, 512)}
GROUP = 8  # weights per codebook entry
QK = 256  # weights per block


@functools.cache
def _tables(fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook (entries, 8) float32, ksigns (128,) int64) from the gguf package."""
    import numpy as np
    from gguf import quants

    cls = quants.IQ2_XXS if fmt == "iq2_xxs" else quants.IQ2_XS
    cls.init_grid()
    grid = torch.from_numpy(np.array(cls.grid, dtype=np.float32).reshape(-1, GROUP))
    ks = torch.from_numpy(np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8).astype(np.int64))
    return grid, ks


def codebook(fmt: str, device=None) -> torch.Tensor:
    return _tables(fmt)[0].to(device)


def _blocks(fmt: str, packed: torch.Tensor) -> torch.Tensor:
    return packed.reshape(-1, LATTICE_CODES[fmt][0])


def lattice_read(fmt: str, packed: torch.Tensor, rows: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale per group (rows, groups) float32 as ggml computes it, codebook index (rows,
    groups) int64, negative-sign mask (rows, groups, 8) bool) of `packed` ((rows, bytes) or
    flat uint8)."""
    from llmpareto.compress.dequant_k import _half

    b = _blocks(fmt, packed)
    n = b.shape[0]
    d = _half(b[:, 0:2]).reshape(n, 1)
    ks = _tables(fmt)[1].to(b.device)
    if fmt == "iq2_xxs":
        words = b[:, 2:].contiguous().view(torch.int32).reshape(n, 8, 2).to(torch.int64) & \
            0xFFFFFFFF
        idx = b[:, 2:].reshape(n, 8, 8)[:, :, :4].to(torch.int64).reshape(n, 32)
        hi = words[:, :, 1]
        ls = (hi >> 28).to(torch.float32)  # (n, 8) per 32 weights
        sign7 = torch.stack([(hi >> (7 * k)) & 127 for k in range(4)], 2).reshape(n, 32)
        per = ls.repeat_interleave(4, 1)
    else:
        qs = b[:, 2:66].contiguous().view(torch.int16).reshape(n, 32).to(torch.int64) & 0xFFFF
        idx, sign7 = qs & 511, qs >> 9
        sc = b[:, 66:74].to(torch.int64)
        ls = torch.stack([sc & 15, sc >> 4], 2).reshape(n, 16).to(torch.float32)  # per 16
        per = ls.repeat_interleave(2, 1)
    db = d * (0.5 + per) * 0.25  # float32, ggml's order
    masks = ks[sign7]
    neg = ((masks.unsqueeze(-1) >> torch.arange(GROUP, device=b.device)) & 1).bool()
    return db.reshape(rows, -1), idx.reshape(rows, -1), neg.reshape(rows, -1, GROUP)


def lattice_values(fmt: str, db: torch.Tensor, idx: torch.Tensor, neg: torch.Tensor
                   ) -> torch.Tensor:
    """(rows, groups * 8) float32 weights, as ggml's dequantize_row_iq2_* computes them."""
    grid = codebook(fmt, idx.device)
    v = db.unsqueeze(-1) * grid[idx]
    return torch.where(neg, -v, v).reshape(db.shape[0], -1)


def lattice_project(fmt: str, y: torch.Tensor, db: torch.Tensor, chunk: int = 8192
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest lattice point of each group of 8 of `y` (rows, cols) under the scales `db`
    (rows, groups), signs of even parity: (codebook index, negative-sign mask), as
    lattice_read gives them. Ties go to the lower index and, for the flip, the lower weight."""
    grid = codebook(fmt, y.device)
    rows = y.shape[0]
    yg = y.detach().float().reshape(-1, GROUP)
    s = db.detach().float().reshape(-1, 1)
    idx_out = torch.empty(yg.shape[0], dtype=torch.int64, device=y.device)
    neg_out = torch.empty(yg.shape, dtype=torch.bool, device=y.device)
    g2 = (grid * grid).sum(1)
    for a in range(0, yg.shape[0], chunk):
        yy, ss = yg[a:a + chunk], s[a:a + chunk]
        ab = yy.abs()
        neg = yy < 0
        odd = (neg.sum(1) % 2 == 1)
        cost = -2 * ss * (ab @ grid.T) + ss * ss * g2  # + sum |y|^2, the same for every entry
        best = cost.argmin(1)
        if odd.any():  # the flip's cost: exactly, over the entries that can still win
            o = odd.nonzero().squeeze(1)
            best[o] = _with_flip(ab[o], ss[o], cost[o], grid)
            flip = (ab[o] * grid[best[o]]).argmin(1)
            neg[o, flip] = ~neg[o, flip]
        idx_out[a:a + chunk] = best
        neg_out[a:a + chunk] = neg
    return idx_out.reshape(rows, -1), neg_out.reshape(rows, -1, GROUP)


def _with_flip(ab: torch.Tensor, s: torch.Tensor, cost: torch.Tensor, grid: torch.Tensor,
               k: int = 16) -> torch.Tensor:
    """Argmin over entries of cost + 4 s min_j |y_j| g_j (groups with odd parity). The flip
    term is >= 0, so only the `k` entries cheapest without it are scored with it; a group whose
    best scored total exceeds its (k+1)-th cost without the flip is scored over every entry."""
    k = min(k, cost.shape[1] - 1)
    low, cand = cost.topk(k + 1, dim=1, largest=False)
    total = low[:, :k] + 4 * s * (ab.unsqueeze(1) * grid[cand[:, :k]]).min(2).values
    val = total.min(1).values
    # ties: the lowest entry index among equal totals, as a full argmin would pick
    best = torch.where(total == val.unsqueeze(1), cand[:, :k], cost.shape[1]).min(1).values
    unsure = (val >= low[:, k]).nonzero().squeeze(1)
    if len(unsure):
        full = cost[unsure] + 4 * s[unsure] * (ab[unsure].unsqueeze(1) * grid).min(2).values
        best[unsure] = full.argmin(1)
    return best


def lattice_pack(fmt: str, packed: torch.Tensor, idx: torch.Tensor, neg: torch.Tensor
                 ) -> torch.Tensor:
    """`packed` (its shape) with the codebook indices `idx` and signs `neg` (even parity per
    group) written in; d and the sub-block scales kept byte for byte."""
    b = _blocks(fmt, packed).clone()
    n = b.shape[0]
    idx = idx.reshape(n, 32).to(torch.int64)
    bits = neg.reshape(n, 32, GROUP).to(torch.int64)
    if (bits.sum(2) % 2).any():
        raise ValueError("a group's signs have odd parity: the format stores 7 of 8")
    sign7 = (bits[:, :, :7] << torch.arange(7, device=b.device)).sum(2)
    if fmt == "iq2_xxs":
        q = b[:, 2:].reshape(n, 8, 8)
        q[:, :, :4] = idx.reshape(n, 8, 4).to(torch.uint8)
        old = q[:, :, 4:].contiguous().view(torch.int32).reshape(n, 8).to(torch.int64) & \
            0xFFFFFFFF
        s4 = sign7.reshape(n, 8, 4)
        word = (old & (0xF << 28)) | s4[:, :, 0] | (s4[:, :, 1] << 7) | (s4[:, :, 2] << 14) | \
            (s4[:, :, 3] << 21)
        word = torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)
        q[:, :, 4:] = word.reshape(n, 8, 1).view(torch.uint8).reshape(n, 8, 4)
        b[:, 2:] = q.reshape(n, 64)
    else:
        qs = (idx | (sign7 << 9)).to(torch.int64)
        qs = torch.where(qs >= 2 ** 15, qs - 2 ** 16, qs).to(torch.int16)
        b[:, 2:66] = qs.contiguous().view(torch.uint8).reshape(n, 64)
    return b.reshape(packed.shape)
