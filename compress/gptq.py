"""GPTQ (Frantar et al. 2022) onto the grids of existing weight formats (q4_0 ... q8_0, int*_g*):
a weight out whose re-quantization with the format's own quantizer is the identity.

Each group's scale (and minimum) follows the format's own RTN rule on the group's weights when
GPTQ reaches the group; the element that defined it (max-abs, or min and max) is forced to the
code RTN gives it, so re-quantizing the output derives the same scale and minimum again. Grids
where float32 rounding could break that (near-constant groups) are first run through the
format's own quantize/dequantize, and only the codes that come back are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmpareto.compress.prune import InputStats, hessian_inverse
from llmpareto.errors import UserError
from llmpareto.formats import FORMATS, get_format

Anchors = list[tuple[torch.Tensor, torch.Tensor]]  # (column in group, forced code), per row


def _f16(x: torch.Tensor) -> torch.Tensor:
    """The float16 a format stores, as the float32 its dequantizer computes with."""
    return x.to(torch.float16).to(torch.float32)


@dataclass(frozen=True)
class Symmetric:
    """d * q, one f16 scale per group (q4_0, q5_0: d = w* / qmin for the max-abs element w*,
    which gets qmin; q8_0: d = |w*| / qmax, and w* gets +-qmax)."""

    group: int
    qmin: int
    qmax: int
    absmax: bool  # q8_0's rule

    def params(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Anchors]:
        imax = g.abs().argmax(1)  # first of ties, as numpy's argmax
        top = g.gather(1, imax[:, None])[:, 0]
        if self.absmax:
            d = top.abs() / self.qmax
            code = torch.where(top < 0, self.qmin, self.qmax)
        else:
            d = top / self.qmin
            code = torch.full_like(imax, self.qmin)
        return _f16(d), torch.zeros_like(d), [(imax, code)]

    def value(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return d * q

    def unproven(self, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Groups whose grid needs checking: none. d * q is exact in float32 (11 x 8 bits), the
        forced extreme d * qmin gives back d exactly, and d * q * fl(1 / d) rounds back to q."""
        return torch.zeros_like(d, dtype=torch.bool)


@dataclass(frozen=True)
class Affine:
    """d * q + m, f16 scale and minimum per group, q in 0..levels (q4_1, q5_1, int*_g*):
    d = (max - min) / levels; the min element gets 0, the max element gets `levels`."""

    group: int
    levels: int
    qmin = 0

    @property
    def qmax(self) -> int:
        return self.levels

    def params(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Anchors]:
        # argmax + gather, not max(dim): with two busy cores that one takes milliseconds
        ihi, ilo = g.argmax(1), g.argmin(1)
        hi, lo = g.gather(1, ihi[:, None])[:, 0], g.gather(1, ilo[:, None])[:, 0]
        top = torch.full_like(ihi, self.levels)
        return _f16((hi - lo) / self.levels), _f16(lo), [(ihi, top), (ilo, torch.zeros_like(ilo))]

    def value(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (d * q) + m  # two float32 roundings, as the dequantizers (no fused multiply-add)

    def unproven(self, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Groups whose grid needs checking. fl(d * q + m) is off d * q + m by at most
        2^-24 |S| (S: the larger end); while S <= 2^8 d levels and d is a normal f16, that is
        < 2^-16 of d * levels, so the re-derived scale rounds to the same f16 and each code
        comes back. Near-constant groups (range << |min|) or tiny scales are checked."""
        s = torch.maximum(m.abs(), ((d * self.levels) + m).abs()).double()
        return (d != 0) & ((d < 2.0 ** -14) | (s > 2.0 ** 8 * self.levels * d.double()))


Grid = Symmetric | Affine

GRIDS: dict[str, Grid] = {
    "q4_0": Symmetric(32, -8, 7, absmax=False),
    "q5_0": Symmetric(32, -16, 15, absmax=False),
    "q8_0": Symmetric(32, -127, 127, absmax=True),
    "q4_1": Affine(32, 15),
    "q5_1": Affine(32, 31),
}
for _name in FORMATS:
    if _m := re.fullmatch(r"int(\d+)_g(\d+)", _name):
        GRIDS[_name] = Affine(int(_m[2]), (1 << int(_m[1])) - 1)


def grid_rule(fmt: str) -> Grid:
    """The grid rule GPTQ rounds onto for weight format `fmt`; a UserError for the others."""
    if fmt not in GRIDS:
        raise UserError(f"--quantizer gptq cannot target weight format {fmt!r}: it needs a "
                        f"per-group scale (and minimum) grid; it targets {', '.join(GRIDS)}. "
                        "Pick one of those, or quantize this format round-to-nearest")
    return GRIDS[fmt]


def min_calibration_tokens(cols: int) -> int:
    """GPTQ's x^T x must have full rank: at least as many tokens as the widest linear input."""
    return cols


def check_calibration_tokens(tokens: int, widest_cols: int) -> None:
    need = min_calibration_tokens(widest_cols)
    if tokens < need:
        raise UserError(f"--quantizer gptq needs at least {need} calibration tokens (the widest "
                        f"linear input has {widest_cols} columns); this run has {tokens}: raise "
                        f"--calib-tokens to {need} or more")


@dataclass(frozen=True)
class HessianFactor:
    """One module's inverse-Hessian factor, shared by every format GPTQ prepares for it."""

    hinv: torch.Tensor  # (cols, cols) float64 upper Cholesky factor of H^-1, columns in `perm` order
    perm: torch.Tensor | None  # act_order: columns by descending diag(H); None: in order
    dead: torch.Tensor  # (cols,) bool, columns no calibration token activates

    @property
    def cols(self) -> int:
        return self.hinv.shape[0]


def prepare_hessian(stats: InputStats, damp: float = 0.01,
                    act_order: bool = False) -> HessianFactor:
    """Factor H = x^T x (+ damp x mean(diag) I) once per module; see `gptq_quantize`."""
    if stats.xtx.dim() != 2:
        raise UserError("--quantizer gptq needs the full x^T x of each linear's inputs, not only "
                        "its diagonal: collect calibration statistics with diag_only=False")
    check_calibration_tokens(stats.tokens, stats.xtx.shape[0])
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(stats.xtx), descending=True, stable=True)
    hinv, dead = hessian_inverse(stats.xtx, damp, perm)
    return HessianFactor(hinv, perm, dead)


class _Groups:
    """Per-group scale, minimum and forced codes of one weight, and how to round a column.
    Column-major like the GPTQ loop: d, m are (groups, rows), forced codes (cols, rows)."""

    def __init__(self, fmt: str, rule: Grid, rows: int, cols: int, device: torch.device):
        self.fmt, self.rule, g = fmt, rule, rule.group
        self.d = torch.zeros(cols // g, rows, device=device)  # float32, as the format stores
        self.m = torch.zeros_like(self.d)
        self.m64 = torch.zeros_like(self.d, dtype=torch.float64)
        self.inv = torch.zeros_like(self.m64)  # 1 / d, 0 where d = 0
        self.none = rule.qmin - 1  # forced code meaning "round"
        self.forced = torch.full((cols, rows), self.none, dtype=torch.int16, device=device)
        self.allowed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # group -> (rows, mask)

    def set(self, k0: int, wg: torch.Tensor) -> None:
        """Groups k0, k0 + 1, ... from their weights `wg` (rows, n, group)."""
        rule, (rows, n, g) = self.rule, wg.shape
        d, m, anchors = rule.params(wg.float().reshape(rows * n, g))
        d, m = _settle(rule, d, m, anchors)
        if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
            raise ValueError(f"{self.fmt}'s float16 scales cannot hold these weights "
                             f"(max |w| {float(wg.abs().max()):.3g}); use its fallback")
        d, allowed = _closure(self.fmt, rule, d, m, anchors)
        d, m = d.view(rows, n).T, m.view(rows, n).T
        self.d[k0:k0 + n], self.m[k0:k0 + n], self.m64[k0:k0 + n] = d, m, m.double()
        self.inv[k0:k0 + n] = torch.where(d == 0, 0.0, 1 / d.double())
        r = torch.arange(rows, device=wg.device)[:, None]
        first = (k0 + torch.arange(n, device=wg.device))[None, :] * g
        for col, code in anchors:  # the min last: with d = 0 both anchors are the same element
            self.forced[first + col.view(rows, n), r] = code.view(rows, n).to(torch.int16)
        # a zero scale's grid is {m}: every code 0, so no -0 = 0 * -q comes out
        self.forced.view(-1, g, rows)[k0:k0 + n].masked_fill_((d == 0)[:, None, :], 0)
        if allowed is None:
            return
        part = ~allowed.all(1).view(rows, n)
        for k in part.any(0).nonzero()[:, 0].tolist():  # almost never: a near-constant group
            sel = part[:, k].nonzero()[:, 0]
            self.allowed[k0 + k] = (sel, allowed.view(rows, n, -1)[sel, k])

    def round(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Column `col` (float64, rows) onto its group's grid, forced codes applied; float64."""
        rule, k = self.rule, col // self.rule.group
        q = ((w - self.m64[k]) * self.inv[k]).round_().clamp_(rule.qmin, rule.qmax)
        if k in self.allowed:
            rows, mask = self.allowed[k]
            q[rows] = _nearest_allowed(rule, w[rows], self.d[k, rows], self.m[k, rows], mask)
        f = self.forced[col]
        q = torch.where(f != self.none, f.double(), q)
        # + 0.0: a code is an integer, so round(-0.3) must give +0, not -0 (d * -0 = -0)
        return rule.value(q.float() + 0.0, self.d[k], self.m[k]).double()


def _settle(rule: Grid, d: torch.Tensor, m: torch.Tensor,
            anchors: Anchors) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale the format's rule derives again from the forced extremes; only a group whose
    minimum dwarfs its range (float32 rounding of d * levels + m) moves, and settles in a step."""
    for _ in range(4):
        ends = torch.stack([rule.value(code.float(), d, m) for _, code in anchors], 1)
        d2, m2, _ = rule.params(ends)
        if torch.equal(d2, d) and torch.equal(m2, m):
            break
        d, m = d2, m2
    return d, m


def _closure(fmt: str, rule: Grid, d: torch.Tensor, m: torch.Tensor,
             anchors: Anchors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where `rule.unproven`, run every code of the grid, beside the forced extremes, through
    the format's own quantize and dequantize: (the scales, 0 where even the extremes do not come
    back; None if every code of every grid comes back bit for bit, else that mask per code)."""
    need = rule.unproven(d, m).nonzero()[:, 0]
    if len(need) == 0:
        return d, None
    codes = torch.arange(rule.qmin, rule.qmax + 1)
    n, na, per = len(need), len(anchors), rule.group - len(anchors)
    nb = -(-len(codes) // per)
    fill = codes.repeat(-(-nb * per // len(codes)))[: nb * per].view(1, nb, per)
    ends = torch.stack([c[need].cpu() for _, c in anchors], 1)[:, None, :]
    probe = torch.cat([ends.expand(-1, nb, -1), fill.expand(n, -1, -1)], 2)
    dn, mn = d[need, None, None].cpu(), m[need, None, None].cpu()
    vals = rule.value(probe.float(), dn, mn).reshape(1, -1)
    f = get_format(fmt)
    back = f.dequantize(f.quantize(vals.numpy()), tuple(vals.shape))
    ok = (torch.from_numpy(back).view(torch.int32) == vals.view(torch.int32)).view(n, nb, -1)
    bad = torch.zeros(n, len(codes), dtype=torch.int32)
    bad.scatter_add_(1, (probe - rule.qmin).reshape(n, -1), (~ok).int().reshape(n, -1))
    allowed = torch.ones(d.shape[0], len(codes), dtype=torch.bool, device=d.device)
    allowed[need] = (bad == 0).to(d.device)
    d = d.clone()
    d[need] = torch.where(ok[:, :, :na].all(2).all(1).to(d.device), d[need], 0.0)
    return d, allowed | (d == 0)[:, None]


def _nearest_allowed(rule: Grid, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    codes = torch.arange(rule.qmin, rule.qmax + 1, device=w.device, dtype=torch.float32)
    grid = rule.value(codes[None, :], d[:, None], m[:, None]).double()
    dist = (w[:, None] - grid).abs().masked_fill(~mask, float("inf"))
    return codes[dist.argmin(1)].double()


def gptq_quantize(w: torch.Tensor, hess: HessianFactor, fmt: str, *,
                  block: int = 128) -> torch.Tensor:
    """GPTQ of `w` (rows x cols, torch Linear layout) onto the grid of weight format `fmt`:
    a float32 weight that `fmt`'s quantize/dequantize returns unchanged, bit for bit (an
    all-zero q4_0/q5_0 block only in value: gguf's own round trip flips its zeros' sign).
    `hess` (from `prepare_hessian`, on w's device) is not changed, so one serves every format.

    Columns go in order (or by descending diag(H) when `hess` was prepared with act_order);
    each is rounded onto its group's grid and its error spread over the columns not yet
    quantized through the rows of the inverse-Hessian factor, `block` columns per lazy batch.
    Without act_order a group's scale comes from its error-updated weights when GPTQ reaches
    it; with act_order all groups' from the original weights up front (static groups).
    Raises ValueError when cols is not a multiple of the format's group, or the weights
    overflow its float16 scales: the caller then uses the format's fallback.
    """
    rule = grid_rule(fmt)
    rows, cols = w.shape
    g = rule.group
    if cols % g:
        raise ValueError(f"{fmt} needs rows of a multiple of {g} weights; this one has {cols}")
    if hess.cols != cols:
        raise ValueError(f"the Hessian factor is for {hess.cols} columns; the weight has {cols}")
    WT = w.T.double().contiguous()  # column-major: GPTQ walks columns
    WT[hess.dead] = 0.0
    groups = _Groups(fmt, rule, rows, cols, WT.device)
    order = torch.arange(cols) if hess.perm is None else hess.perm.cpu()
    if hess.perm is not None:
        groups.set(0, WT.view(cols // g, g, rows).permute(2, 0, 1))
        WT = WT[hess.perm]
    Hinv, QT = hess.hinv, torch.empty_like(WT)
    blk = -(-block // g) * g  # whole groups per batch, so a group starts on updated weights
    for i1 in range(0, cols, blk):
        i2 = min(i1 + blk, cols)
        W1, H1 = WT[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i, col in enumerate(order[i1:i2].tolist()):
            if hess.perm is None and col % g == 0:
                groups.set(col // g, W1[i:i + g].T.unsqueeze(1))
            QT[i1 + i] = q = groups.round(W1[i], col)
            torch.div(W1[i] - q, H1[i, i], out=err[i])
            W1[i + 1:].addr_(H1[i, i + 1:], err[i], alpha=-1)
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, err, alpha=-1)
    if hess.perm is not None:
        QT = QT[torch.argsort(hess.perm)]
    return QT.T.float().contiguous()
