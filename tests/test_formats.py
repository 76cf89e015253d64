"""Weight formats: bit-identical to the gguf package, exact bits per weight, fallbacks, RTN."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from llmpareto.errors import UserError
from llmpareto.formats import FORMATS, GGUF_FORMATS, SIMPLE_FORMATS, effective_format, get_format

EXPECTED_BPW = {"f16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5,
                "tq2_0": 2.0625}
# llama.cpp's K- and i-quants (ggml-common.h block layouts: bytes per 256 weights, iq4_nl 32)
K_BPW = {"q6_K": 6.5625, "q5_K": 5.5, "q4_K": 4.5, "q3_K": 3.4375, "q2_K": 2.625,
         "iq4_nl": 4.5, "iq4_xs": 4.25, "iq2_xs": 2.3125, "iq2_xxs": 2.0625}
GGUF_NAMES = {"f16": "F16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0", "q4_1": "Q4_1",
              "q4_0": "Q4_0", "tq2_0": "TQ2_0"}


def _weights(rows=48, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[0, :7] = [0.0, -0.0, 1e-8, -3.0, 3.0, 65000.0, -1e-3]  # edge values
    return w


def test_every_gguf_format_is_registered():
    assert set(SIMPLE_FORMATS) == set(EXPECTED_BPW)
    assert set(GGUF_FORMATS) == set(EXPECTED_BPW) | set(K_BPW)


@pytest.mark.parametrize("name", sorted(K_BPW))
def test_k_and_i_quants_exact_size_and_dequantize_like_the_gguf_package(name):
    """Quantized by llama.cpp's ggml (see test_kquants.py for the byte identity with
    llama-quantize); its C dequantizer agrees with the gguf package's numpy one."""
    fmt = get_format(name)
    w = _weights(cols=512)
    imatrix = np.random.default_rng(1).random(512).astype(np.float32) + 0.1
    packed = fmt.quantize(w, imatrix)
    assert fmt.bits_per_weight == K_BPW[name]
    assert packed.nbytes == fmt.nbytes(*w.shape) and packed.nbytes * 8 == K_BPW[name] * w.size
    ours = fmt.dequantize(packed, w.shape)
    ref = quants.dequantize(packed, GGMLQuantizationType(fmt.gguf_type)).reshape(w.shape)
    assert np.allclose(ours, ref, rtol=1e-6, atol=1e-7)
    err = np.linalg.norm(ours[1:] - w[1:]) / np.linalg.norm(w[1:])  # row 0 holds edge values
    assert err < {2: 0.45, 3: 0.2, 4: 0.1, 5: 0.05, 6: 0.03}[fmt.payload_bits]


@pytest.mark.parametrize("name", sorted(EXPECTED_BPW))
def test_gguf_format_bit_identical_to_gguf_package(name):
    fmt = get_format(name)
    w = _weights()
    qtype = GGMLQuantizationType[GGUF_NAMES[name]]
    ref_packed = quants.quantize(w, qtype)
    packed = fmt.quantize(w)
    assert packed.dtype == ref_packed.dtype and np.array_equal(packed.view(np.uint8),
                                                               ref_packed.view(np.uint8))
    ours = fmt.dequantize(packed, w.shape)
    ref = quants.dequantize(ref_packed, qtype).reshape(w.shape)
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))  # bits, not just values
    assert fmt.gguf_type == int(qtype)


@pytest.mark.parametrize("name", sorted(EXPECTED_BPW))
def test_exact_bits_per_weight_match_stored_bytes(name):
    fmt = get_format(name)
    w = _weights()
    assert fmt.bits_per_weight == EXPECTED_BPW[name]
    assert fmt.nbytes(*w.shape) == fmt.quantize(w).nbytes
    assert fmt.nbytes(*w.shape) * 8 == EXPECTED_BPW[name] * w.size


def test_fallbacks_follow_llama_cpp():
    assert effective_format("tq2_0", 576) == "q4_0"  # 576 is not a multiple of 256
    assert effective_format("tq2_0", 1536) == "tq2_0"
    assert effective_format("q4_0", 48) == "f16"
    assert effective_format("int4_g128", 192) == "int4_g64"
    assert effective_format("int4_g128", 96) == "f16"
    # llama.cpp's tensor_type_fallback for rows that are not a multiple of 256
    for k, fb in (("q2_K", "q4_0"), ("q3_K", "q4_0"), ("q4_K", "q5_0"), ("q5_K", "q5_1"),
                  ("q6_K", "q8_0"), ("iq4_xs", "iq4_nl"), ("iq2_xxs", "iq4_nl")):
        assert effective_format(k, 576) == fb and effective_format(k, 1536) == k
    assert effective_format("iq4_nl", 48) == "f16"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [64, 128])
def test_rtn_round_trip_error_and_size(bits, group):
    fmt = get_format(f"int{bits}_g{group}")
    w = _weights(cols=256)
    w[0, :7] = 0.0  # keep the group range normal for the error bound below
    deq = fmt.dequantize(fmt.quantize(w), w.shape)
    g = w.reshape(w.shape[0], -1, group)
    step = (g.max(2) - g.min(2)) / ((1 << bits) - 1)
    err = np.abs(deq - w).reshape(g.shape).max(2)
    # half a step, plus what storing scale and minimum in f16 costs
    assert np.all(err <= 0.5 * step + 2e-3 * np.abs(g).max(2) + 1e-6)
    assert fmt.bits_per_weight == bits + 32 / group
    if bits < 8:
        more = get_format(f"int{bits + 1 if bits < 4 else 8}_g{group}")
        assert np.abs(more.dequantize(more.quantize(w), w.shape) - w).mean() < np.abs(deq - w).mean()


def test_unknown_format_is_a_user_error():
    with pytest.raises(UserError, match="known formats"):
        get_format("q3_k")
    assert len(FORMATS) == 7 + 9 + 8


@pytest.mark.parametrize("name", sorted(EXPECTED_BPW))
def test_torch_dequantizer_bit_identical_to_gguf(name):
    from llmpareto.compress.dequant import dequantize_torch

    w = _weights(rows=64, cols=768, seed=3)
    qtype = GGMLQuantizationType[GGUF_NAMES[name]]
    packed = quants.quantize(w, qtype)
    ref = quants.dequantize(packed, qtype).reshape(w.shape)
    ours = dequantize_torch(name, packed, w.shape).numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
