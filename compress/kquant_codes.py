"""The codes of llama.cpp's K-quants (and of its legacy 32-weight blocks, q4_0 ... q8_0) apart
from their scales: read a packed tensor's per-weight
scale, offset and code (`k_grid`), and write other codes into the same blocks, every scale
byte kept (`k_pack`). Block-wise reconstruction learns the rounding onto the scales llama.cpp's
quantizer chose and stores the result in the format itself, so the file holds exactly the
weights that were scored.

The layouts are ggml's (block_q2_K ... block_q6_K in ggml-common.h), read as
compress.dequant_k reads them; `value = scale * code - offset` in float32 is what
`dequantize_row_*` computes (one product exact, one rounding), checked against it in
tests/test_reconstruct.py.
"""

from __future__ import annotations

import torch

from llmpareto.compress.dequant_k import (
    _half,
    _k4_scales,
    _nibble_pairs,
    _q3_scales,
    _shifts,
    iq4_xs_scales,
)

# format -> (block bytes, lowest code, highest code)
K_CODES = {"q2_K": (84, 0, 3), "q3_K": (110, -4, 3), "q4_K": (144, 0, 15),
           "q5_K": (176, 0, 31), "q6_K": (210, -32, 31)}
# llama.cpp's legacy blocks of 32 (block_q4_0 ... block_q8_0): the same reading and writing,
# the scale (and minimum) an f16 per block; codes as ggml's dequantize_row_* uses them
LEGACY_CODES = {"q4_0": (18, -8, 7), "q4_1": (20, 0, 15), "q5_0": (22, -16, 15),
                "q5_1": (24, 0, 31), "q8_0": (34, -128, 127)}
# llama.cpp's 4-bit i-quants: a code indexes 16 non-uniform levels (kvalues_iq4nl), the weight
# is scale * level; iq4_nl lays its blocks of 32 out as q4_0 does, iq4_xs as 8 sub-blocks of 32
# under one float16 scale, each with a 6-bit scale (stored + 32)
I_CODES = {"iq4_nl": (18, 0, 15), "iq4_xs": (136, 0, 15)}
CODES = {**K_CODES, **LEGACY_CODES, **I_CODES}
# the float16 fields of a block that scale it: (scale d, minimum or dmin; None: symmetric), as
# byte offsets (ggml-common.h); a learned scale is written there and nowhere else
SCALE_FIELDS = {"q4_0": (0, None), "q4_1": (0, 2), "q5_0": (0, None), "q5_1": (0, 2),
                "q8_0": (0, None), "q2_K": (80, 82), "q3_K": (108, None), "q4_K": (0, 2),
                "q5_K": (0, 2), "q6_K": (208, None), "iq4_nl": (0, None), "iq4_xs": (0, None)}


def block_weights(fmt: str) -> int:
    """Weights per block (one float16 scale): 32 for llama.cpp's legacy blocks and iq4_nl, 256
    for the K-quants and iq4_xs."""
    return 32 if fmt in LEGACY_CODES or fmt == "iq4_nl" else 256


def levels(fmt: str, like: torch.Tensor) -> torch.Tensor | None:
    """The values a code indexes (i-quants: float32 kvalues_iq4nl), None where the code is
    the value (every other format here)."""
    from llmpareto.compress.dequant_k import _IQ4_LEVELS

    return _IQ4_LEVELS.to(like.device, torch.float32) if fmt in I_CODES else None


def k_rescale(fmt: str, packed: torch.Tensor, scale: torch.Tensor,
              minimum: torch.Tensor | None = None) -> torch.Tensor:
    """`packed` with each block's float16 scale (and minimum / dmin) multiplied by
    `1 + scale` (and `1 + minimum`), (rows, blocks per row) each, rounded to float16 as
    llama.cpp stores them; codes and sub-block scales unchanged (so `k_grid` of the result
    gives every weight's new scale and offset exactly)."""
    out = _blocks(fmt, packed.clone())
    for at, factor in zip(SCALE_FIELDS[fmt], (scale, minimum), strict=True):
        if at is None or factor is None:
            continue
        old = _half(out[:, at:at + 2])
        new = (old * (1 + factor.reshape(-1, 1).to(old))).to(torch.float16)
        out[:, at:at + 2] = new.contiguous().view(torch.uint8).reshape(-1, 2)
    return out.reshape(packed.shape)


def _blocks(fmt: str, packed: torch.Tensor) -> torch.Tensor:
    return packed.reshape(-1, CODES[fmt][0])


def _legacy_grid(fmt: str, b: torch.Tensor):
    """(scale, offset, code) per weight of legacy blocks `b` (n, bytes), each (n, 32)."""
    n = b.shape[0]
    d = _half(b[:, 0:2]).expand(n, 32)
    if fmt == "q8_0":
        return d, torch.zeros_like(d), b[:, 2:34].contiguous().view(torch.int8).to(torch.int32)
    has_min = fmt in ("q4_1", "q5_1")
    off = -_half(b[:, 2:4]).expand(n, 32) if has_min else torch.zeros_like(d)
    qs = b[:, -16:].to(torch.int32)
    q = torch.cat([qs & 0xF, qs >> 4], 1)  # element j: low nibble of byte j; j + 16: high
    if fmt in ("q5_0", "q5_1"):
        h = 2 + 2 * has_min
        qh = b[:, h:h + 4].to(torch.int64)
        bits = (qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24)[:, None]
        q = q | (((bits >> torch.arange(32, device=b.device)) & 1).to(torch.int32) << 4)
    return d, off, q + CODES[fmt][1] * (not has_min)


def _legacy_pack(fmt: str, out: torch.Tensor, q: torch.Tensor) -> None:
    """Write codes `q` (n, 32) into legacy blocks `out` (n, bytes) in place."""
    if fmt == "q8_0":
        out[:, 2:34] = q.to(torch.int8).view(torch.uint8)
        return
    has_min = fmt in ("q4_1", "q5_1")
    u = q - CODES[fmt][1] * (not has_min)
    out[:, -16:] = ((u[:, :16] & 0xF) | ((u[:, 16:] & 0xF) << 4)).to(torch.uint8)
    if fmt in ("q5_0", "q5_1"):
        h = 2 + 2 * has_min
        bits = (((u >> 4) & 1).to(torch.int64) << torch.arange(32, device=u.device)).sum(1)
        out[:, h:h + 4] = torch.stack([(bits >> (8 * i)) & 0xFF for i in range(4)], 1).to(
            torch.uint8)


def _expand(x: torch.Tensor, per: int) -> torch.Tensor:
    """(n, sub-blocks) -> (n, 256), each value over its `per` weights."""
    return x[:, :, None].expand(-1, -1, per).reshape(x.shape[0], 256)


def k_grid(fmt: str, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, offset, code) per weight of a packed (rows, bytes) K-quant tensor, each
    (rows, cols): the weight is scale * code - offset in float32 (an i-quant's: scale *
    levels[code])."""
    rows = packed.shape[0]
    b = _blocks(fmt, packed)
    n = b.shape[0]
    if fmt in LEGACY_CODES or fmt == "iq4_nl":  # iq4_nl: q4_0's layout, codes from 0
        scale, off, q = _legacy_grid(fmt, b)
    elif fmt == "iq4_xs":
        scale = _expand(iq4_xs_scales(b), 32)
        qs = b[:, 8:136].reshape(n, 8, 16).to(torch.int32)
        q = torch.cat([qs & 0xF, qs >> 4], 2).reshape(n, 256)
        off = torch.zeros_like(scale)
    elif fmt in ("q4_K", "q5_K"):
        q = _nibble_pairs(b[:, 16:144] if fmt == "q4_K" else b[:, 48:176]).to(torch.int32)
        if fmt == "q5_K":
            qh = b[:, 16:48].reshape(n, 1, 32)
            q = q | (((qh >> _shifts(list(range(8)), (1, 8, 1), qh)) & 1).to(torch.int32) << 4)
        sc, mn = _k4_scales(b[:, 4:16])
        scale, off = _half(b[:, 0:2]) * sc, _half(b[:, 2:4]) * mn
        scale, off, q = _expand(scale, 32), _expand(off, 32), q.reshape(n, 256)
    elif fmt == "q6_K":
        ql = b[:, 0:128].reshape(n, 2, 2, 32)
        low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4,
                           ql[:, :, 1] >> 4], 2)
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        high = (qh >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qh)) & 3
        q = ((low | (high << 4)).to(torch.int32) - 32).reshape(n, 256)
        sc = b[:, 192:208].contiguous().view(torch.int8).reshape(n, 16).float()
        scale = _expand(_half(b[:, 208:210]) * sc, 16)
        off = torch.zeros_like(scale)
    elif fmt == "q2_K":
        sc = b[:, 0:16]
        qs = b[:, 16:80].reshape(n, 2, 1, 32)
        q = ((qs >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)) & 3).to(torch.int32).reshape(n, 256)
        scale = _expand(_half(b[:, 80:82]) * (sc & 0xF).float(), 16)
        off = _expand(_half(b[:, 82:84]) * (sc >> 4).float(), 16)
    elif fmt == "q3_K":
        hm = b[:, 0:32].reshape(n, 1, 1, 32)
        qs = b[:, 32:96].reshape(n, 2, 1, 32)
        low = ((qs >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)) & 3).to(torch.int32)
        bit = ((hm >> _shifts(list(range(8)), (1, 2, 4, 1), hm)) & 1).to(torch.int32)
        q = (low - 4 * (1 - bit)).reshape(n, 256)
        scale = _expand(_half(b[:, 108:110]) * _q3_scales(b[:, 96:108]).float(), 16)
        off = torch.zeros_like(scale)
    else:
        raise KeyError(f"{fmt} is not a K-quant with codes apart from its scales")
    return (scale.reshape(rows, -1), off.reshape(rows, -1), q.reshape(rows, -1))


def _pairs(q: torch.Tensor, n: int, bits: int, parts: int) -> torch.Tensor:
    """(n, parts * 32) codes laid out (n, groups, parts, 32) -> bytes sum(code << bits*t)."""
    q = q.reshape(n, -1, parts, 32).to(torch.int32)
    shift = torch.arange(parts, dtype=torch.int32, device=q.device)[None, None, :, None] * bits
    return (q << shift).sum(2).to(torch.uint8).reshape(n, -1)


def k_pack(fmt: str, packed: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`packed` with its codes replaced by `codes` ((rows, cols) integers in the format's
    range); every scale and minimum byte unchanged."""
    _, lo, hi = CODES[fmt]
    if int(codes.min()) < lo or int(codes.max()) > hi:
        raise ValueError(f"{fmt} codes must be in {lo}..{hi}")
    out = _blocks(fmt, packed.clone())
    n = out.shape[0]
    if fmt in LEGACY_CODES or fmt == "iq4_nl":
        _legacy_pack(fmt, out, codes.reshape(n, 32).to(torch.int32))
        return out.reshape(packed.shape)
    q = codes.reshape(n, 256).to(torch.int32)
    if fmt == "iq4_xs":  # byte j of sub-block k: element j low, j + 16 high
        u = q.reshape(n, 8, 32)
        out[:, 8:136] = ((u[:, :, :16] & 0xF) | (u[:, :, 16:] << 4)).to(torch.uint8).reshape(
            n, 128)
    if fmt in ("q4_K", "q5_K"):
        nib = _pairs(q & 0xF, n, 4, 2)  # sub-blocks 2c and 2c + 1 share chunk c
        if fmt == "q4_K":
            out[:, 16:144] = nib
        else:
            out[:, 48:176] = nib
            out[:, 16:48] = _pairs((q >> 4) & 1, n, 1, 8)  # byte l: bit k of sub-block k
    elif fmt == "q6_K":
        u = (q + 32).reshape(n, 2, 4, 32)
        low, high = u & 0xF, u >> 4
        ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)],
                         2)  # (n, 2, 2, 32)
        out[:, 0:128] = ql.to(torch.uint8).reshape(n, 128)
        out[:, 128:192] = _pairs(high, n, 2, 4)
    elif fmt == "q2_K":
        out[:, 16:80] = _pairs(q, n, 2, 4)
    elif fmt == "q3_K":
        u = q + 4
        out[:, 32:96] = _pairs(u & 3, n, 2, 4)
        out[:, 0:32] = _pairs(u >> 2, n, 1, 8)  # bit 4 * half + quarter of byte l
    return out.reshape(packed.shape)
