"""Block-wise reconstruction (compress/reconstruct.py) on a tiny random Llama: a block's output
error below RTN's and GPTQ's on the same grid, and weights the format's own quantizer returns
unchanged (so the GGUF holds what was scored)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmpareto.compress.gptq import gptq_quantize, prepare_hessian
from llmpareto.compress.prune import InputStats
from llmpareto.compress.reconstruct import SCALE_RANGE, block_inputs, reconstruct_block
from llmpareto.formats import get_format

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (40, 64), generator=gen)
    # one call per window: what reconstruction takes mini-batches of
    inputs = [block_inputs(model.model.layers, lambda i=i: model(input_ids=ids[i:i + 1]))[0]
              for i in range(len(ids))]
    return model, inputs


def _mse(block, inputs, weights: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        base = [block(*a, **k)[0] if isinstance(block(*a, **k), tuple) else block(*a, **k)
                for a, k in inputs]
        got = [torch.func.functional_call(block, weights, a, k) for a, k in inputs]
        got = [g[0] if isinstance(g, tuple) else g for g in got]
    return float(sum(torch.mean((g - b) ** 2) for g, b in zip(got, base)) / len(inputs))


def _gptq(block, inputs, fmt: str) -> dict[str, torch.Tensor]:
    """GPTQ of every linear on the same inputs (each layer's own x^T x)."""
    mods = {n: block.get_submodule(n) for n in LINEARS}
    stats = {n: InputStats.empty(m.in_features) for n, m in mods.items()}

    def hook(name):
        def f(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            stats[name].xtx += x.T @ x
            stats[name].tokens += x.shape[0]
        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    with torch.no_grad():
        for a, k in inputs:
            block(*a, **k)
    for h in hs:
        h.remove()
    return {f"{n}.weight": gptq_quantize(m.weight.detach(), prepare_hessian(stats[n]), fmt)
            for n, m in mods.items()}


def _rtn(block, fmt: str) -> dict[str, torch.Tensor]:
    f = get_format(fmt)
    out = {}
    for n in LINEARS:
        w = block.get_submodule(n).weight.detach().float().numpy()
        out[f"{n}.weight"] = torch.from_numpy(f.dequantize(f.quantize(w), w.shape).copy())
    return out


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_block_reconstruction_beats_rtn_and_gptq_and_is_exact(tiny, fmt):
    model, inputs = tiny
    block = model.model.layers[0]
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    train, held = inputs[:32], inputs[32:]  # the error is judged on windows it never saw
    got = reconstruct_block(block, train, {f"{n}.weight": fmt for n in LINEARS}, steps=200)
    # the block itself is untouched
    assert all(torch.equal(before[n], p) for n, p in block.named_parameters())
    assert all(not p.requires_grad or p.grad is None for p in block.parameters())
    # V = 0 is nearest rounding on the stored (f16) scale; llama.cpp rounds with the f32 one
    assert got.mse_rtn == pytest.approx(_mse(block, train, _rtn(block, fmt)), rel=0.05)
    assert _mse(block, train, got.weights) == pytest.approx(got.mse, rel=1e-4)
    rtn, ours = _mse(block, held, _rtn(block, fmt)), _mse(block, held, got.weights)
    gptq = _mse(block, held, _gptq(block, train, fmt))
    print(fmt, {"rtn": rtn, "gptq": gptq, "reconstructed": ours})
    assert ours < 0.9 * rtn and ours < gptq, (ours, rtn, gptq)
    # a fixed point of the format's quantizer, bit for bit
    f = get_format(fmt)
    for name, w in got.weights.items():
        arr = w.numpy()
        back = f.dequantize(f.quantize(arr), arr.shape)
        assert np.array_equal(back.view(np.int32), arr.view(np.int32)), name


def test_reconstruction_refuses_what_it_cannot_do(tiny):
    model, inputs = tiny
    block = model.model.layers[0]
    with pytest.raises(KeyError, match="no parameter"):
        reconstruct_block(block, inputs, {"mlp.nothing.weight": "q4_0"}, steps=1)
    from llmpareto.errors import UserError

    with pytest.raises(UserError, match="tq2_0"):  # ternary blocks: no grid here
        reconstruct_block(block, inputs, {"mlp.up_proj.weight": "tq2_0"}, steps=1)
    with pytest.raises(ValueError, match="post-training blocks"):
        reconstruct_block(block, inputs, {"mlp.up_proj.weight": "iq2_xs"}, steps=1)
    with pytest.raises(ValueError, match="post-training blocks"):
        reconstruct_block(block, inputs, {"mlp.up_proj.weight": "iq4_xs"}, steps=1)
    with pytest.raises(ValueError, match="post-training blocks"):
        reconstruct_block(block, inputs, {"mlp.up_proj.weight": "q4_K"}, steps=1)


@pytest.mark.parametrize("fmt", ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K",
                                 "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "iq4_xs"])
def test_k_quant_codes_read_and_written_as_llama_cpp_does(fmt):
    """k_grid's scale * code - offset (an i-quant's scale * level) is ggml's dequantization bit
    for bit, and k_pack writes other codes into the blocks with every scale byte kept
    (K-quants, the legacy blocks, iq4_nl and iq4_xs)."""
    from llmpareto.compress.kquant_codes import CODES as K_CODES
    from llmpareto.compress.kquant_codes import k_grid, k_pack, levels

    f = get_format(fmt)
    w = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    packed = torch.from_numpy(f.quantize(w))
    scale, off, q = k_grid(fmt, packed)
    lv = levels(fmt, scale)
    assert (lv is None) == (fmt[:2] != "iq")

    def value(s, o, c):
        return s * (c.float() if lv is None else lv[c.long()]) - o

    assert torch.equal(value(scale, off, q), torch.from_numpy(f.dequantize(packed.numpy(),
                                                                          w.shape).copy()))
    assert torch.equal(k_pack(fmt, packed, q), packed)
    _, lo, hi = K_CODES[fmt]
    other = torch.randint(lo, hi + 1, q.shape, generator=torch.Generator().manual_seed(2))
    again = k_pack(fmt, packed, other)
    s2, o2, q2 = k_grid(fmt, again)
    assert torch.equal(q2, other) and torch.equal(s2, scale) and torch.equal(o2, off)
    assert torch.equal(value(s2, o2, q2), torch.from_numpy(f.dequantize(again.numpy(),
                                                                        w.shape).copy()))


def _mlp_block() -> tuple[torch.nn.Module, list]:
    """A 512-256-512 MLP (rows multiples of 256, as the K- and i-quants need) and 40 inputs of
    correlated features of unequal energy, as activations are (where rounding can be chosen
    better than to nearest)."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 512)).eval()
    mix = torch.randn(512, 512) * torch.logspace(0, -2, 512)[:, None]
    return block, [((torch.randn(1, 64, 512) @ mix,), {}) for _ in range(40)]


@pytest.mark.parametrize("fmt", ["q2_K", "q3_K", "q4_K", "q4_0", "q5_1", "iq4_nl", "iq4_xs"])
def test_k_quant_rounding_learned_onto_llama_cpp_scales_beats_its_codes(fmt):
    """On a block whose rows are multiples of 256: codes learned onto the scales llama.cpp's
    quantizer chose lower the block's output error below those of the quantizer itself, on
    inputs it never learned on, and the result is the blocks' own dequantization."""
    from llmpareto.compress.dequant_k import K_DEQUANT
    from llmpareto.compress.kquant_codes import k_grid

    block, xs = _mlp_block()
    learn, held = xs[:32], xs[32:]
    f = get_format(fmt)
    names = ["0.weight", "2.weight"]
    params = dict(block.named_parameters())
    packed = {n: torch.from_numpy(f.quantize(params[n].detach().numpy())) for n in names}
    ptq = {n: torch.from_numpy(f.dequantize(packed[n].numpy(), tuple(params[n].shape)).copy())
           for n in names}
    codes = reconstruct_block(block, learn, dict.fromkeys(names, fmt), steps=60,
                              packed=packed, learn_scales=False)
    both = reconstruct_block(block, learn, dict.fromkeys(names, fmt), steps=60, packed=packed)
    # learning the stored scales too lowers the error on held-out inputs further (0.90 ->
    # 0.60-0.76 of the quantizer's own for q2_K ... q6_K, q4_0, q5_1 here)
    assert _mse(block, held, both.weights) < 0.97 * _mse(block, held, codes.weights)
    for got, scales_learned in ((codes, False), (both, True)):
        assert _mse(block, held, got.weights) < _mse(block, held, ptq)
        for n in names:
            out = got.packed[n]
            own = torch.from_numpy(f.dequantize(out.numpy(), tuple(params[n].shape)).copy()) \
                if fmt not in K_DEQUANT else K_DEQUANT[fmt][1](out.reshape(
                    -1, K_DEQUANT[fmt][0])).reshape(params[n].shape)
            assert torch.equal(got.weights[n], own)  # what llama.cpp reads from the blocks
            new, old = k_grid(fmt, out)[0], k_grid(fmt, packed[n])[0]
            if not scales_learned:
                assert torch.equal(new, old)  # scales kept
            else:  # the stored scales moved, within SCALE_RANGE (and float16 rounding)
                ratio = new[old != 0] / old[old != 0]
                assert not torch.equal(new, old)
                assert float((ratio - 1).abs().max()) <= SCALE_RANGE + 2e-3


@pytest.mark.parametrize("fmt", ["iq2_xxs", "iq2_xs"])
def test_lattice_codes_read_and_written_as_llama_cpp_does(fmt):
    """lattice_read's scale * codebook entry * sign is ggml's dequantization bit for bit;
    lattice_pack writes other codes (even sign parity) into the blocks with d and the sub-block
    scales kept; the projection returns a lattice point's own codes, and its shortcut (the
    flip's cost scored on the cheapest entries only) equals the full search."""
    from llmpareto.compress import lattice_codes as lc

    f = get_format(fmt)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 512)).astype(np.float32)
    packed = torch.from_numpy(f.quantize(w, rng.uniform(0.5, 2, 512).astype(np.float32)))
    packed = packed.reshape(6, -1)
    db, idx, neg = lc.lattice_read(fmt, packed, 6)
    assert torch.equal(lc.lattice_values(fmt, db, idx, neg),
                       torch.from_numpy(f.dequantize(packed.numpy(), w.shape).copy()))
    assert torch.equal(lc.lattice_pack(fmt, packed, idx, neg), packed)
    gen = torch.Generator().manual_seed(2)
    other = torch.randint(0, lc.LATTICE_CODES[fmt][1], idx.shape, generator=gen)
    signs = torch.rand(neg.shape, generator=gen) < 0.5
    signs[..., 7] = signs[..., :7].sum(-1) % 2 == 1  # even parity
    again = lc.lattice_pack(fmt, packed, other, signs)
    db2, idx2, neg2 = lc.lattice_read(fmt, again, 6)
    assert torch.equal(db2, db) and torch.equal(idx2, other) and torch.equal(neg2, signs)
    assert torch.equal(lc.lattice_values(fmt, db2, idx2, neg2),
                       torch.from_numpy(f.dequantize(again.numpy(), w.shape).copy()))
    point = lc.lattice_values(fmt, db2, idx2, neg2)
    got = lc.lattice_project(fmt, point, db2)
    live = db2.unsqueeze(-1) > 0
    assert torch.equal(got[0][db2 > 0], other[db2 > 0])
    assert torch.equal(got[1] & live, signs & live)
    y = torch.from_numpy(w) * 1.3
    fast = lc.lattice_project(fmt, y, db)
    full = lc._with_flip
    try:  # every entry scored with its flip
        lc._with_flip = lambda ab, s, cost, grid: (
            cost + 4 * s * (ab.unsqueeze(1) * grid).min(2).values).argmin(1)
        slow = lc.lattice_project(fmt, y, db)
    finally:
        lc._with_flip = full
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    # the nearest point: no worse than ggml's own codes under the same scales
    near = lc.lattice_project(fmt, torch.from_numpy(w), db)
    err = ((lc.lattice_values(fmt, db, *near) - torch.from_numpy(w)) ** 2).sum()
    assert err <= ((lc.lattice_values(fmt, db, idx, neg) - torch.from_numpy(w)) ** 2).sum()


@pytest.mark.parametrize("fmt", ["iq2_xxs", "iq2_xs"])
def test_lattice_rounding_learned_onto_llama_cpp_scales_beats_its_codes(fmt):
    """A 2-bit lattice i-quant (iq2_xxs, iq2_xs): codes learned onto the scales llama.cpp's
    quantizer chose (with an importance matrix, as it needs) lower the block's output error
    below the quantizer's own on inputs never learned on; the result is ggml's dequantization
    of the blocks written, whose scales are the quantizer's byte for byte."""
    from llmpareto.compress import lattice_codes as lc

    block, xs = _mlp_block()
    learn, held = xs[:32], xs[32:]
    f = get_format(fmt)
    names = ["0.weight", "2.weight"]
    params = dict(block.named_parameters())
    with torch.no_grad():
        x0 = torch.cat([a[0].reshape(-1, 512) for a, _ in learn])
        x2 = torch.nn.functional.gelu(block[0](x0))
    imx = {"0.weight": (x0 ** 2).mean(0).numpy(), "2.weight": (x2 ** 2).mean(0).numpy()}
    packed = {n: torch.from_numpy(f.quantize(params[n].detach().numpy(), imx[n]))
              for n in names}
    ptq = {n: torch.from_numpy(f.dequantize(packed[n].numpy(), tuple(params[n].shape)).copy())
           for n in names}
    got = reconstruct_block(block, learn, dict.fromkeys(names, fmt), steps=60, packed=packed)
    assert _mse(block, held, got.weights) < 0.97 * _mse(block, held, ptq)
    for n in names:
        rows = params[n].shape[0]
        out = got.packed[n]
        own = torch.from_numpy(f.dequantize(out.numpy(), tuple(params[n].shape)).copy())
        assert torch.equal(got.weights[n], own)  # what llama.cpp reads from the blocks
        assert torch.equal(lc.lattice_read(fmt, out, rows)[0],
                           lc.lattice_read(fmt, packed[n], rows)[0])  # scales kept
        assert not torch.equal(out, packed[n].reshape(out.shape))  # codes moved


def test_a_whole_model_block_by_block_beats_rtn_on_windows_it_never_saw(tiny):
    """reconstruct_model: each block learns on what the blocks before it (reconstructed)
    give; the last block's output on held-out windows is closer to the float model's than
    with every weight rounded to nearest, and the model is left as it was."""
    from llmpareto.compress.reconstruct import reconstruct_model

    model, inputs = tiny
    layers = list(model.model.layers)
    train, held = inputs[:32], inputs[32:]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fmts = [{f"{n}.weight": "q4_0" for n in LINEARS} for _ in layers]
    weights, reports = reconstruct_model(layers, train, fmts, steps=100)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert len(weights) == len(reports) == len(layers)

    def last_output(ws_per_block):
        outs = []
        with torch.no_grad():
            for args, kwargs in held:
                for block, ws in zip(layers, ws_per_block):
                    y = torch.func.functional_call(block, ws, args, kwargs)
                    y = y[0] if isinstance(y, tuple) else y
                    args = (y, *args[1:])
                outs.append(y)
        return outs

    ref = last_output([{} for _ in layers])
    rtn = last_output([_rtn(b, "q4_0") for b in layers])
    ours = last_output(weights)

    def err(outs):
        return float(sum(torch.mean((o - r) ** 2) for o, r in zip(outs, ref)))

    print({"rtn": err(rtn), "reconstructed": err(ours)})
    assert err(ours) < 0.9 * err(rtn)


def test_starting_at_gptq_codes_and_early_stopping_on_held_out_windows(tiny):
    """`start` puts the offsets at the post-training codes (GPTQ's lie on the grid: its loss
    is the start's exactly), and with `holdout` the kept offsets are judged on windows never
    learned on: never worse there than the start, and a learning rate that wrecks the
    learning (a step of 0.5 a code, undecayed) leaves the start."""
    model, inputs = tiny
    block = model.model.layers[0]
    train, held = inputs[:24], inputs[24:32]
    fmts = {f"{n}.weight": "q4_0" for n in LINEARS}
    gptq = _gptq(block, train, "q4_0")
    # zero steps: the start itself, on the grid, is GPTQ's weights bit for bit
    got = reconstruct_block(block, train + held, fmts, steps=0, start=gptq, holdout=len(held))
    for n, w in got.weights.items():
        assert torch.equal(w, gptq[n].float()), n
    assert got.mse_rtn == pytest.approx(_mse(block, held, gptq), rel=1e-4)
    # learning from GPTQ's codes, judged on the held-out windows
    got = reconstruct_block(block, train + held, fmts, steps=100, start=gptq,
                            holdout=len(held))
    assert got.mse <= got.mse_rtn
    assert _mse(block, held, got.weights) == pytest.approx(got.mse, rel=1e-4)
    # the held-out windows are never learned on: changing them changes nothing but the
    # judgement, and a learning that only gets worse keeps the start
    bad = reconstruct_block(block, train + held, fmts, steps=20, lr=100.0, start=gptq,
                            holdout=len(held))
    assert bad.mse == pytest.approx(bad.mse_rtn, rel=1e-6)
    for n, w in bad.weights.items():
        assert torch.equal(w, gptq[n].float()), n
    with pytest.raises(ValueError, match="holdout"):
        reconstruct_block(block, held, fmts, steps=1, holdout=len(held))
