"""The torch dequantizers of llama.cpp's K-quants and iq4_nl/iq4_xs (compress.dequant_k, what a
GPU run dequantizes with) against ggml's own `dequantize_row_*`: equal to the bit, here on the
CPU (on the GPU: tests/test_cuda.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmpareto.compress.dequant import dequantize_torch
from llmpareto.compress.dequant_k import K_DEQUANT
from llmpareto.formats import get_format


def _weights() -> np.ndarray:
    """Rows of very different scales, an all-zero stretch, tiny and huge values."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((24, 768)) * rng.uniform(1e-3, 4, (24, 1))
    w[0, :300] = 0
    w[1] *= 1e-5
    w[2, ::7] = 60.0
    w[3] = np.abs(w[3])  # one-signed rows exercise the minimums of q2_K/q4_K/q5_K
    return w.astype(np.float32)


@pytest.mark.parametrize("fmt", sorted(K_DEQUANT))
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_k_quants_dequantize_in_torch_exactly_as_ggml(fmt, with_imatrix):
    f = get_format(fmt)
    w = _weights()
    imx = np.random.default_rng(3).uniform(0.05, 3, w.shape[1]).astype(np.float32)
    packed = f.quantize(w, imx) if with_imatrix and f.takes_imatrix else f.quantize(w)
    block_bytes, fn = K_DEQUANT[fmt]
    assert packed.size == w.size // (32 if fmt == "iq4_nl" else 256) * block_bytes
    out = fn(torch.from_numpy(np.ascontiguousarray(packed)).reshape(-1, block_bytes))
    assert np.array_equal(out.reshape(w.shape).numpy(), f.dequantize(packed, w.shape))


def test_on_the_cpu_k_quants_keep_ggmls_faster_path():
    packed = get_format("q4_K").quantize(_weights())
    assert dequantize_torch("q4_K", packed, (24, 768)) is None  # the caller uses ggml
    assert dequantize_torch("q4_0", get_format("q4_0").quantize(_weights()), (24, 768)) \
        is not None
