"""The grids block-wise reconstruction learns on (compress/reconstruct.py): a weight's codes as
offsets from a start, and for llama.cpp's own blocks their stored float16 scales too.

`_Weight`: a group-wise grid (q4_0 ... q8_0 and int*_g*) whose scales the format's RTN rule
derives from the base weights. `_KWeight`: llama.cpp's blocks (legacy, K-quants and the 4-bit
i-quants) as its quantizer packed them, codes and stored scales learned, written back into the
same blocks. An i-quant's codes index non-uniform levels: learning happens in code units (the
levels' piecewise-linear inverse), where RTN is still the nearest integer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmpareto.compress.gptq import _Groups, grid_rule
from llmpareto.compress.kquant_codes import (
    CODES,
    SCALE_FIELDS,
    block_weights,
    k_grid,
    k_pack,
    k_rescale,
    levels,
)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _to_index(lv: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """A value in scale units -> code units: itself, or with levels `lv` (an i-quant's) their
    piecewise-linear inverse (the nearest integer is the nearest level; offsets of +-1 move a
    weight to the neighbouring levels)."""
    if lv is None:
        return y
    i = (torch.searchsorted(lv, y.detach().contiguous()) - 1).clamp(0, len(lv) - 2)
    return i + (y - lv[i]) / (lv[i + 1] - lv[i])


def _to_value(lv: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Codes -> values in scale units: themselves, or the levels `lv` interpolated between
    them (exact at integers; a straight-through code carries the levels' slope)."""
    if lv is None:
        return q
    i = q.detach().floor().clamp(0, len(lv) - 2).long()
    return lv[i] + (q - i) * (lv[i + 1] - lv[i])


@dataclass
class _Weight:
    """One linear weight's grid (from the base weights) as dense (rows, cols) tensors."""

    w: torch.Tensor  # float32 base weight
    groups: _Groups
    d: torch.Tensor  # (rows, cols) scale of each weight's group
    m: torch.Tensor  # (rows, cols) minimum (0 for symmetric grids)
    inv: torch.Tensor  # 1 / d, 0 where d = 0
    forced: torch.Tensor  # (rows, cols) forced code, or groups.none
    start: torch.Tensor | None = None  # offsets of the post-training codes (None: RTN)

    @classmethod
    def of(cls, w: torch.Tensor, fmt: str, start: torch.Tensor | None = None) -> _Weight:
        """`start`: post-training weights of this format (imatrix, GPTQ); the grid is the one
        the format's quantizer gives them (GPTQ's own scales: its weights lie on it) and
        learning starts at their nearest codes on it instead of at RTN of `w`."""
        rule = grid_rule(fmt)
        rows, cols = w.shape
        g = rule.group
        if cols % g:
            raise ValueError(f"{fmt} needs rows of a multiple of {g} weights; this one has {cols}")
        groups = _Groups(fmt, rule, rows, cols, w.device)
        on = w if start is None else start.to(w.device)  # the grid: the start's own scales
        groups.set(0, on.detach().float().view(rows, cols // g, g))
        d = groups.d.T.repeat_interleave(g, 1)
        m = groups.m.T.repeat_interleave(g, 1)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        w = w.detach().float().clone()
        v0 = None
        if start is not None:
            x = (w - m) * inv
            q = torch.round((start.to(w.device, torch.float32) - m) * inv)
            v0 = torch.where(d == 0, torch.zeros_like(d), q - x)
        return cls(w, groups, d, m, inv, groups.forced.T.contiguous(), v0)

    @property
    def v0(self) -> torch.Tensor:
        # round-to-nearest (AutoRound's start), or the post-training codes
        return torch.zeros_like(self.w) if self.start is None else self.start

    scales: tuple[int, ...] | None = None  # int* grids: scales not learned (see _KWeight)

    def index(self) -> torch.Tensor:
        """Each base weight in code units (RTN's code: its nearest integer)."""
        return (self.w - self.m) * self.inv

    def quantized(self, v: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """The weight on the grid with offsets `v` (differentiable in v, straight-through)."""
        rule = self.groups.rule
        q = _RoundSTE.apply((self.w - self.m) * self.inv + v).clamp(rule.qmin, rule.qmax)
        q = torch.where(self.forced != self.groups.none, self.forced.float(), q)
        return rule.value(q, self.d, self.m)

    def exact(self, v: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """The final weight, column by column through the grid's own rounding (forced codes,
        near-constant groups' allowed codes): a fixed point of the format's quantizer."""
        shifted = (self.w + v * self.d).double()
        cols = [self.groups.round(shifted[:, c], c) for c in range(self.w.shape[1])]
        return torch.stack(cols, 1).float().contiguous()


@dataclass
class _KWeight:
    """One K-quant weight's grid: the scales and minimums llama.cpp's quantizer chose (its
    packed blocks), codes learned onto them; starts at the quantizer's own codes."""

    w: torch.Tensor  # float32 base weight
    fmt: str
    packed: torch.Tensor  # (rows, bytes) uint8, the post-training blocks
    d: torch.Tensor  # (rows, cols) scale
    m: torch.Tensor  # (rows, cols) -offset: the weight is d * q + m
    inv: torch.Tensor
    v0: torch.Tensor
    fields: tuple  # per stored float16 field (scale, minimum): its (rows, blocks) values and
    # the integer each weight multiplies it by (sub-block scale, 1 or -1), or None
    out: torch.Tensor | None = None  # the blocks `exact` wrote
    lv: torch.Tensor | None = None  # the levels a code indexes (i-quants), else None

    def index(self) -> torch.Tensor:
        """Each base weight in code units (RTN's code: its nearest integer)."""
        return _to_index(self.lv, (self.w - self.m) * self.inv)

    @classmethod
    def of(cls, w: torch.Tensor, fmt: str, packed: torch.Tensor) -> _KWeight:
        from llmpareto.compress.dequant_k import _half

        w = w.detach().float().clone()
        packed = packed.to(w.device)
        d, off, q = k_grid(fmt, packed)
        m = -off
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        lv = levels(fmt, w)
        v0 = torch.where(d == 0, torch.zeros_like(d), q.float() - _to_index(lv, (w - m) * inv))
        rows, per = w.shape[0], block_weights(fmt)
        blocks = packed.reshape(-1, CODES[fmt][0])
        fields = []
        for at, per_weight in zip(SCALE_FIELDS[fmt], (d, off), strict=True):
            if at is None:
                fields.append(None)
                continue
            value = _half(blocks[:, at:at + 2]).reshape(rows, -1)
            wide = value.repeat_interleave(per, 1)
            fields.append((value, torch.where(wide == 0, torch.zeros_like(wide),
                                              torch.round(per_weight / wide))))
        return cls(w, fmt, packed, d, m, inv, v0, tuple(fields), lv=lv)

    @property
    def scales(self) -> tuple[int, ...]:
        """Shape of the learned scale factors: (2, rows, blocks per row), the block's float16
        scale and minimum (dmin) each multiplied by 1 + factor (AutoRound's learned min/max
        scaling, here onto the fields the format stores; a symmetric format's second row is
        unused)."""
        rows, cols = self.w.shape
        return (2, rows, cols // block_weights(self.fmt))

    def _grid(self, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, -offset, 1/scale) per weight with the stored fields times 1 + s, rounded to
        float16 as `exact` stores them (straight-through) and multiplied by each weight's
        integer as llama.cpp does: the surrogate rounds exactly as the export will."""
        if s is None:
            return self.d, self.m, self.inv
        per = block_weights(self.fmt)
        (dv, dk), mins = self.fields

        def stored(value: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            x = value * (1 + factor)
            return (x + (x.half().float() - x).detach()).repeat_interleave(per, 1)

        d = stored(dv, s[0]) * dk
        m = self.m if mins is None else -(stored(mins[0], s[1]) * mins[1])
        return d, m, torch.where(d == 0, torch.zeros_like(d), 1 / d)

    def quantized(self, v: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """The weight on the grid with offsets `v` (and scale factors `s`), differentiable
        straight-through: d/dv is the level spacing, d/d(scale) the rounding residual in scale
        units (for linear codes exactly what rounding through `inv` gives; for an i-quant's
        levels the same, where a chain through the inverse would scale it by the ratio of two
        segments' slopes)."""
        _, lo, hi = CODES[self.fmt]
        d, m, inv = self._grid(s)
        y = (self.w - m) * inv
        if self.lv is None:
            return d * _RoundSTE.apply(y + v).clamp(lo, hi) + m
        z = (_to_index(self.lv, y.detach()) + v).clamp(lo, hi)
        soft = y + _to_value(self.lv, z)
        return d * (self.lv[torch.round(z).long()] + soft - soft.detach()) + m

    def exact(self, v: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """The final weight as llama.cpp dequantizes the blocks with the learned codes (and
        scales, rounded to float16 in their fields first; codes rounded on those), kept in
        `out`, to be written as they are."""
        from llmpareto.compress.dequant_k import K_DEQUANT
        from llmpareto.formats import get_format

        with torch.no_grad():
            packed = self.packed if s is None else k_rescale(self.fmt, self.packed, s[0], s[1])
            d, off, _ = k_grid(self.fmt, packed)
            _, lo, hi = CODES[self.fmt]
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            codes = torch.round(_to_index(self.lv, (self.w + off) * inv) + v).clamp(lo, hi)
            self.out = k_pack(self.fmt, packed, codes.to(torch.int32))
        rows, cols = self.w.shape
        if self.fmt not in K_DEQUANT:  # a legacy block: the format's own dequantizer
            got = get_format(self.fmt).dequantize(self.out.cpu().numpy(), (rows, cols))
            return torch.from_numpy(np.ascontiguousarray(got)).to(self.w.device).float()
        return K_DEQUANT[self.fmt][1](self.out.reshape(-1, K_DEQUANT[self.fmt][0])).reshape(
            rows, cols).float().contiguous()


LEVEL_GAP = 17.0  # the lattice codebooks' entries are 8, 25, 43: about 17 apart


@dataclass
class _LatticeWeight:
    """One 2-bit lattice i-quant weight (iq2_xxs, iq2_xs): the scales llama.cpp's quantizer
    chose (its packed blocks) kept, each group of 8 weights moved to the nearest lattice point
    of the weight plus a learned offset (straight-through), starting at the quantizer's own
    codes. Offsets are in units of the level gap (LEVEL_GAP times the group's scale), so a
    learning rate of 1 / steps moves a weight about half a level, as AutoRound's do on a grid;
    the scales are not learned (`scales` None)."""

    w: torch.Tensor  # float32 base weight
    fmt: str
    packed: torch.Tensor  # (rows, bytes) uint8, the post-training blocks
    db: torch.Tensor  # (rows, groups) scale of each group of 8
    unit: torch.Tensor  # (rows, cols) one level gap in weight units
    v0: torch.Tensor  # offsets of the post-training point
    out: torch.Tensor | None = None  # the blocks `exact` wrote
    scales: tuple[int, ...] | None = None

    @classmethod
    def of(cls, w: torch.Tensor, fmt: str, packed: torch.Tensor) -> _LatticeWeight:
        from llmpareto.compress.lattice_codes import GROUP, lattice_read, lattice_values

        w = w.detach().float().clone()
        packed = packed.to(w.device).reshape(w.shape[0], -1)
        db, idx, neg = lattice_read(fmt, packed, w.shape[0])
        unit = (LEVEL_GAP * db).repeat_interleave(GROUP, 1)
        start = lattice_values(fmt, db, idx, neg)
        v0 = torch.where(unit == 0, torch.zeros_like(w), (start - w) / unit)
        return cls(w, fmt, packed, db, unit, v0)

    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Offsets stay within half a level gap of the base weight or of the start."""
        return torch.minimum(self.v0, torch.zeros_like(self.v0)) - 0.5, \
            torch.maximum(self.v0, torch.zeros_like(self.v0)) + 0.5

    def _codes(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from llmpareto.compress.lattice_codes import lattice_project

        return lattice_project(self.fmt, y, self.db)

    def quantized(self, v: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """The nearest lattice point of w + v (straight-through: d/dv is the level gap)."""
        from llmpareto.compress.lattice_codes import lattice_values

        y = self.w + v * self.unit
        on = lattice_values(self.fmt, self.db, *self._codes(y))
        return y + (on - y).detach()

    def exact(self, v: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """The final weight as ggml dequantizes the blocks holding the learned codes (kept in
        `out`, to be written as they are)."""
        from llmpareto.compress.lattice_codes import lattice_pack
        from llmpareto.formats import get_format

        with torch.no_grad():
            self.out = lattice_pack(self.fmt, self.packed, *self._codes(self.w + v * self.unit))
        got = get_format(self.fmt).dequantize(self.out.cpu().numpy(), tuple(self.w.shape))
        return torch.from_numpy(np.ascontiguousarray(got)).to(self.w.device).float()
