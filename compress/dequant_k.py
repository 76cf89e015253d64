"""Torch dequantizers for llama.cpp's K-quants and 4-bit i-quants, bit-identical to ggml's own
`dequantize_row_*` (ggml-quants.c), so a GPU run dequantizes them on the GPU.

Each follows ggml's float operations in its order. They are exact on every CPU and GPU whether
or not a compiler fuses a multiply and an add: every product here is exact in float32 (a half
scale times a small integer times a small integer needs at most 24 bits), so the one rounding
is the subtraction's (or iq4_xs's single product's), fused or not.
"""

from __future__ import annotations

import torch

# ggml's kvalues_iq4nl: the 16 non-uniform levels of iq4_nl and iq4_xs
_IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10,
                            1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32)


def _half(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) bytes -> (n, 1) float32 of the little-endian float16 they hold."""
    return b.contiguous().view(torch.float16).float()


def _shifts(values: list[int], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).reshape(shape)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4 for j = 0..7: (n, 12) packed bytes -> 6-bit scales and mins."""
    s = s.to(torch.int32)
    j = torch.arange(8, device=s.device)
    lo = j < 4
    sc = torch.where(lo, s[:, j] & 63,
                     (s[:, j + 4] & 0xF) | ((s[:, (j - 4).clamp(min=0)] >> 6) << 4))
    mn = torch.where(lo, s[:, j + 4] & 63, (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4))
    return sc.float(), mn.float()


def _k4_dequant(d: torch.Tensor, dmin: torch.Tensor, scales: torch.Tensor,
                q: torch.Tensor) -> torch.Tensor:
    """y = (d * sc) * q - (dmin * m) for 8 sub-blocks of 32: q is (n, 8, 32)."""
    sc, mn = _k4_scales(scales)
    d1, m1 = (d * sc)[:, :, None], (dmin * mn)[:, :, None]
    return (d1 * q.float() - m1).reshape(q.shape[0], 256)


def _nibble_pairs(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): per 32 bytes, the low nibbles then the high ones."""
    q = qs.reshape(qs.shape[0], 4, 1, 32)
    return ((q >> _shifts([0, 4], (1, 1, 2, 1), q)) & 0xF).reshape(qs.shape[0], 8, 32)


def q4_K(b: torch.Tensor) -> torch.Tensor:
    return _k4_dequant(_half(b[:, 0:2]), _half(b[:, 2:4]), b[:, 4:16], _nibble_pairs(b[:, 16:]))


def q5_K(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qh = b[:, 16:48].reshape(n, 1, 32)
    high = (qh >> _shifts(list(range(8)), (1, 8, 1), qh)) & 1  # sub-block k reads bit k
    q = _nibble_pairs(b[:, 48:]) | (high << 4)
    return _k4_dequant(_half(b[:, 0:2]), _half(b[:, 2:4]), b[:, 4:16], q)


def q6_K(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [half of the block, l or l + 32, l]
    low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4],
                      2)  # (n, 2, 4, 32): the four quarters of each 128
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qh)) & 3
    q = (low | (high << 4)).to(torch.int32) - 32
    sc = b[:, 192:208].contiguous().view(torch.int8).reshape(n, 2, 4, 2, 1).float()
    d = _half(b[:, 208:210]).reshape(n, 1, 1, 1, 1)
    return ((d * sc) * q.reshape(n, 2, 4, 2, 16).float()).reshape(n, 256)


def q2_K(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, 0:16]
    qs = b[:, 16:80].reshape(n, 2, 1, 32)
    q = ((qs >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)) & 3).reshape(n, 16, 16)
    dl = (_half(b[:, 80:82]) * (sc & 0xF).float())[:, :, None]
    ml = (_half(b[:, 82:84]) * (sc >> 4).float())[:, :, None]
    return (dl * q.float() - ml).reshape(n, 256)


_KMASK1, _KMASK2 = 0x03030303, 0x0F0F0F0F


def _q3_scales(raw: torch.Tensor) -> torch.Tensor:
    """The 16 6-bit scales of a q3_K block, unpacked from 12 bytes as ggml does (on uint32
    words), minus 32."""
    a = raw.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (n, 3) words
    a0, a1, t = a[:, 0], a[:, 1], a[:, 2]
    words = torch.stack([(a0 & _KMASK2) | ((t & _KMASK1) << 4),
                         (a1 & _KMASK2) | (((t >> 2) & _KMASK1) << 4),
                         ((a0 >> 4) & _KMASK2) | (((t >> 4) & _KMASK1) << 4),
                         ((a1 >> 4) & _KMASK2) | (((t >> 6) & _KMASK1) << 4)], 1)
    scales = words.to(torch.int32).contiguous().view(torch.uint8).reshape(raw.shape[0], 16)
    return scales.to(torch.int32) - 32


def q3_K(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hm = b[:, 0:32].reshape(n, 1, 1, 32)
    qs = b[:, 32:96].reshape(n, 2, 1, 32)
    low = ((qs >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)) & 3).to(torch.int32)
    # sub-block (half, j) reads hmask bit 4 * half + j; a clear bit subtracts 4
    bit = (hm >> _shifts(list(range(8)), (1, 2, 4, 1), hm)) & 1
    q = (low - 4 * (1 - bit.to(torch.int32))).reshape(n, 16, 16)
    dl = (_half(b[:, 108:110]) * _q3_scales(b[:, 96:108]).float())[:, :, None]
    return (dl * q.float()).reshape(n, 256)


def _iq4_levels(nibbles: torch.Tensor) -> torch.Tensor:
    return _IQ4_LEVELS.to(nibbles.device)[nibbles.long()]


def iq4_nl(b: torch.Tensor) -> torch.Tensor:
    qs = b[:, 2:18]
    q = torch.cat([qs & 0xF, qs >> 4], 1)
    return _half(b[:, 0:2]) * _iq4_levels(q)


def iq4_xs_scales(b: torch.Tensor) -> torch.Tensor:
    """The 8 sub-block scales (n, 8) of iq4_xs blocks `b`: d times the 6-bit scale less 32."""
    high = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # (n, 1)
    low = b[:, 4:8].to(torch.int32)
    ib = torch.arange(8, device=b.device)
    ls = ((low[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((high >> (2 * ib)) & 3) << 4)
    return _half(b[:, 0:2]) * (ls - 32).float()


def iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl = iq4_xs_scales(b)[:, :, None]  # (n, 8, 1)
    qs = b[:, 8:136].reshape(n, 8, 16)
    q = torch.cat([qs & 0xF, qs >> 4], 2)  # (n, 8, 32)
    return (dl * _iq4_levels(q)).reshape(n, 256)


K_DEQUANT = {"q2_K": (84, q2_K), "q3_K": (110, q3_K), "q4_K": (144, q4_K),
             "q5_K": (176, q5_K), "q6_K": (210, q6_K), "iq4_nl": (18, iq4_nl),
             "iq4_xs": (136, iq4_xs)}
