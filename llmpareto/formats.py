"""Weight formats: name -> exact bits per weight, quantize/dequantize, block size.

GGUF block formats delegate to the `gguf` package so a searched model and its GGUF export
hold bit-identical weights; `int{b}_g{g}` are round-to-nearest formats for GPU-style targets.
All functions here are pure numpy on 2-D float32 arrays (rows x columns, blocks along rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmpareto.errors import UserError

QuantizeFn = Callable[..., np.ndarray]  # (w, imatrix=None) -> packed
DequantizeFn = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


@dataclass(frozen=True)
class WeightFormat:
    name: str
    block_size: int  # weights per block, along a row; a row must be a multiple of it
    block_bytes: int  # stored bytes per block, scales and minimums included
    quantize: QuantizeFn  # float32 (rows, cols)[, imatrix (cols,)] -> packed uint8/f16 array
    dequantize: DequantizeFn  # (packed, shape) -> float32 (rows, cols)
    fallback: str | None  # used where a row is not a multiple of block_size (as llama.cpp does)
    gguf_type: int | None = None  # GGMLQuantizationType value when GGUF can hold it
    compute_dtype: str = "int8"  # the kernel dtype a device needs to run it natively
    payload_bits: int = 16  # bits of the weight codes alone, scales and minimums excluded
    # False for asymmetric formats (d * q + min): a pruned zero comes back as a small non-zero
    # unless 0 happens to land on the block's grid, so an N:M pattern is not kept
    keeps_zeros: bool = True
    # llama.cpp's quantizer for this type weighs its rounding error by an importance matrix
    # (per-column mean squared activation) when given one; `quantize(w, imatrix)` passes it
    takes_imatrix: bool = False

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.block_size

    def fits(self, cols: int) -> bool:
        return cols % self.block_size == 0

    def nbytes(self, rows: int, cols: int) -> int:
        """Exact stored bytes of a (rows, cols) weight in this format."""
        return rows * (cols // self.block_size) * self.block_bytes

    def scale_bytes(self, rows: int, cols: int) -> int:
        """The part of nbytes that is scales and minimums, not weight codes."""
        return self.nbytes(rows, cols) - rows * cols * self.payload_bits // 8


FORMATS: dict[str, WeightFormat] = {}


def register(fmt: WeightFormat) -> WeightFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> WeightFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(
            f"unknown weight format {name!r}; known formats: {', '.join(FORMATS)}"
        ) from None


def effective_format(name: str, cols: int) -> str:
    """The format a row of `cols` weights really gets: `name`, or its fallback chain."""
    seen = []
    while not get_format(name).fits(cols):
        seen.append(name)
        nxt = get_format(name).fallback
        if nxt is None or nxt in seen:
            return "f16"
        name = nxt
    return name


# --- GGUF block formats -------------------------------------------------------------------
# Without an importance matrix the simple types go through the gguf package's numpy reference
# (bit-identical to ggml's `quantize_row_*_ref`); with one, and for the K- and i-quants always,
# through llama.cpp's own `ggml_quantize_chunk` (llmpareto.ggml), as llama-quantize does.

def _gguf_format(name: str, type_name: str, fallback: str | None, compute: str,
                 payload_bits: int, keeps_zeros: bool, takes_imatrix: bool) -> WeightFormat:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    numpy_ref = type_name in ("F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "TQ2_0")

    def quantize(w: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if numpy_ref and (imatrix is None or not takes_imatrix):
            return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
        from llmpareto import ggml

        return ggml.quantize(w, int(qtype), imatrix if takes_imatrix else None)

    def dequantize(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        if numpy_ref:
            return quants.dequantize(packed, qtype).reshape(shape)
        from llmpareto import ggml

        return ggml.dequantize(packed, name, shape)

    return WeightFormat(name, block_size, block_bytes, quantize, dequantize, fallback,
                        int(qtype), compute, payload_bits, keeps_zeros, takes_imatrix)


# (name, GGML type, llama.cpp's fallback for rows that are not a multiple of the block,
#  kernel dtype, payload bits, keeps a pruned zero, takes an importance matrix)
for _spec in (
    ("f16", "F16", None, "f16", 16, True, False),
    ("q8_0", "Q8_0", "f16", "int8", 8, True, False),
    ("q6_K", "Q6_K", "q8_0", "int8", 6, True, True),
    ("q5_K", "Q5_K", "q5_1", "int8", 5, False, True),
    ("q5_1", "Q5_1", "f16", "int8", 5, False, True),
    ("q5_0", "Q5_0", "f16", "int8", 5, True, True),
    ("q4_K", "Q4_K", "q5_0", "int8", 4, False, True),
    ("q4_1", "Q4_1", "f16", "int8", 4, False, True),
    ("q4_0", "Q4_0", "f16", "int8", 4, True, True),
    # non-uniform 16-level grid without a zero (kvalues_iq4nl)
    ("iq4_nl", "IQ4_NL", "f16", "int8", 4, False, True),
    ("iq4_xs", "IQ4_XS", "iq4_nl", "int8", 4, False, True),
    ("q3_K", "Q3_K", "q4_0", "int8", 3, True, True),
    ("q2_K", "Q2_K", "q4_0", "int8", 2, False, True),
    # ggml refuses to make these without an importance matrix (ggml_quantize_requires_imatrix)
    ("iq2_xs", "IQ2_XS", "iq4_nl", "int8", 2, False, True),
    ("iq2_xxs", "IQ2_XXS", "iq4_nl", "int8", 2, False, True),
    ("tq2_0", "TQ2_0", "q4_0", "int8", 2, True, False),
):
    register(_gguf_format(*_spec))

# The fallbacks are llama.cpp's `tensor_type_fallback` (src/llama-quant.cpp): a K- or i-quant
# whose rows are not a multiple of 256 becomes q4_0 (q2_K, q3_K, tq2_0), q5_0 (q4_K), q5_1
# (q5_K), q8_0 (q6_K) or iq4_nl (iq4_xs); a 32-block type that does not fit becomes f16.
GGUF_FORMATS = tuple(FORMATS)
# the 32-weight block types llama.cpp had before K-quants (and the ternary tq2_0)
SIMPLE_FORMATS = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "tq2_0")


# --- Round-to-nearest integer formats: per-group fp16 scale and fp16 minimum -------------

def rtn_quantize(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Asymmetric min-max RTN. Packed row layout: [scales f16 | mins f16 | codes u8]."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group).astype(np.float32)
    lo, hi = g.min(axis=2), g.max(axis=2)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).astype(np.float16)
    lo16 = lo.astype(np.float16)
    s32 = scale.astype(np.float32)
    safe = np.where(s32 > 0, s32, 1.0)
    codes = np.clip(np.rint((g - lo16.astype(np.float32)[..., None]) / safe[..., None]), 0, levels)
    return np.concatenate(
        [scale.view(np.uint8), lo16.view(np.uint8), codes.astype(np.uint8).reshape(rows, -1)],
        axis=1,
    )


def rtn_dequantize(packed: np.ndarray, shape: tuple[int, int], group: int) -> np.ndarray:
    rows, cols = shape
    n = cols // group
    scale = packed[:, : 2 * n].copy().view(np.float16).astype(np.float32)
    lo = packed[:, 2 * n : 4 * n].copy().view(np.float16).astype(np.float32)
    codes = packed[:, 4 * n :].reshape(rows, n, group).astype(np.float32)
    return (codes * scale[..., None] + lo[..., None]).reshape(rows, cols)


def _rtn_format(bits: int, group: int) -> WeightFormat:
    # Stored bytes count the bit-packed codes a deployment kernel would hold; the in-memory
    # cache keeps one byte per code for speed (docs/architecture.md: the prepared-variant cache).
    block_bytes = (bits * group) // 8 + 4
    fallback = f"int{bits}_g{group // 2}" if group > 64 else "f16"
    return WeightFormat(
        f"int{bits}_g{group}", group, block_bytes,
        lambda w, imatrix=None: rtn_quantize(w, bits, group),
        lambda p, s: rtn_dequantize(p, s, group),
        fallback, None, "int8" if bits <= 8 else "f16", bits, keeps_zeros=False,
    )


for _bits in (2, 3, 4, 8):
    for _group in (64, 128):
        register(_rtn_format(_bits, _group))
