"""Torch dequantizers for packed GGUF blocks, bit-identical to the gguf package's numpy ones.

They run the same float32 operations in the same order (a multiply, then an add: never a
fused multiply-add), so results match to the bit, while using torch's threads, or the GPU
(elementwise float32 kernels round as IEEE 754 says there too: tests/test_cuda.py). A trial
spends this time on every tensor whose format changed, so it sits on the search's hot path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from llmpareto.compress.dequant_k import K_DEQUANT

_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 2, 1)
_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32).reshape(1, 32)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b[:, :2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32): low nibbles first, then high nibbles (ggml order)."""
    return ((qs.unsqueeze(1) >> _NIBBLE_SHIFTS.to(qs.device)) & 0x0F).reshape(qs.shape[0], 32)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes, read as a little-endian uint32 -> (n, 32) bits."""
    word = qh.contiguous().view(torch.int32)  # (n, 1); sign does not matter after the mask
    return ((word >> _BIT_SHIFTS.to(qh.device)) & 1).to(torch.uint8)


def q8_0(b: torch.Tensor) -> torch.Tensor:
    x = b[:, 2:].contiguous().view(torch.int8).float()
    return x * _f16(b)


def q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return _f16(b) * q.float()


def q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b), _f16(b[:, 2:])
    return (d * _nibbles(b[:, 4:]).float()).add_(m)


def q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(b) * q.float()


def q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b), _f16(b[:, 2:])
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return (d * q.float()).add_(m)


def tq2_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs = b[:, :64].reshape(n, 2, 1, 32)
    q = ((qs >> _CRUMB_SHIFTS.to(b.device)) & 0x03).reshape(n, 256).to(torch.int8) - 1
    return _f16(b[:, 64:]) * q.float()


BLOCK_DEQUANT: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "q8_0": (34, q8_0), "q4_0": (18, q4_0), "q4_1": (20, q4_1),
    "q5_0": (22, q5_0), "q5_1": (24, q5_1), "tq2_0": (66, tq2_0),
    **K_DEQUANT,  # llama.cpp's K-quants and iq4_nl/iq4_xs (compress.dequant_k)
}


def dequantize_torch(fmt: str, packed: np.ndarray | torch.Tensor, shape: tuple[int, int],
                     device: torch.device | None = None) -> torch.Tensor | None:
    """float32 (rows, cols) tensor on `device` (None: where `packed` is; packed codes may be a
    numpy array or a tensor, e.g. pinned on the host), or None when `fmt` has no torch path."""
    if fmt != "f16" and fmt not in BLOCK_DEQUANT:
        return None
    codes = packed if isinstance(packed, torch.Tensor) else torch.from_numpy(packed)
    if fmt in K_DEQUANT and (device or codes.device).type == "cpu":
        return None  # on the CPU ggml's own C dequantizers are 5-25x faster (bench_devices)
    if device is not None and codes.device != device:
        codes = codes.to(device, non_blocking=True)
    if fmt == "f16":
        return codes.reshape(shape).float()
    block_bytes, fn = BLOCK_DEQUANT[fmt]
    return fn(codes.reshape(-1, block_bytes)).reshape(shape)
