"""Block-wise reconstruction (AutoRound / SignRound, Cheng et al. 2023): each linear of a block
is rounded onto its format's grid with a learned offset V in [-0.5, 0.5] per weight, chosen by
signed gradient descent so that the block's output on calibration inputs matches the float
block's, instead of each weight being rounded to its nearest grid point (RTN) or each layer's
output being matched on its own (GPTQ).

The grid is the format's own (q4_0 ... q8_0, int*_g*: `compress.gptq.GRIDS`): per group the
scale (and minimum) the format's RTN rule derives from the base weights, the elements that
define it forced to their codes. So the result is a fixed point of the format's quantizer: the
GGUF export holds exactly the weights that were scored. llama.cpp's own blocks (q4_0 ... q8_0
and the K-quants, `compress.kquant_codes`) are learned onto the scales its quantizer chose,
and those stored scales themselves within SCALE_RANGE (AutoRound's learned min/max scaling);
iq4_nl and iq4_xs too (codes index their non-uniform levels); the 2-bit lattice i-quants
(iq2_xxs, iq2_xs: `compress.lattice_codes`) by the nearest codebook point of the weight plus
a learned offset, onto the scales their quantizer chose (iq3_* and iq1_* are not covered).

Pure tensor functions: a block (any nn.Module), its captured inputs, its weights' formats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llmpareto.compress.kquant_codes import CODES, LEGACY_CODES
from llmpareto.compress.lattice_codes import LATTICE_CODES
from llmpareto.compress.round_grids import _KWeight, _LatticeWeight, _Weight

BlockInput = tuple[tuple, dict]  # (args, kwargs) of one call of a block's forward
SCALE_RANGE = 0.2  # a learned block scale stays within +-20% of the one its quantizer chose,
SCALE_STEP = 0.01  # moved by signed steps of SCALE_STEP times the offsets' learning rate: with
# AutoRound's lr = 1 / steps, at most ~0.5% in all (a scale moves a whole block's weights;
# larger steps undid the offsets' gains on 512x256 test blocks, 0.01-0.02 halved held-out error)
EDGE = 0.01  # offsets' bounds stay this far inside the half-way points between codes


@dataclass
class Reconstructed:
    """Per weight name (as in block.named_parameters()), the float32 weight on its grid; the
    block output's mean squared error against the float block, at the start (RTN, or the
    post-training codes given) and after, on the windows the offsets are chosen on (the
    held-out ones when there are)."""

    weights: dict[str, torch.Tensor]
    mse_rtn: float
    mse: float
    steps: int
    packed: dict[str, torch.Tensor] = field(default_factory=dict)  # K-quants: their blocks


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def block_inputs(layers: Sequence[nn.Module], run: Callable[[], object]) -> list[BlockInput]:
    """The (args, kwargs) each block of `layers` is called with while `run()` runs the model
    once, each block fed the float output of the one before (Llama-style stacks: the hidden
    state is the first positional argument or `hidden_states`)."""
    from llmpareto.compress.calibration import _Stop

    caught: list[BlockInput] = []

    def catch(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():  # not inference_mode: reconstruction differentiates through them
            run()
    except _Stop:
        pass
    finally:
        h.remove()
    args, kwargs = caught[0]
    # no KV cache: each call must see only its own window (a cache would grow across calls
    # and chain one step's graph to the next)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    out = []
    with torch.no_grad():
        for layer in layers:
            out.append((args, kwargs))
            hidden = _output(layer(*args, **kwargs))
            args, kwargs = ((hidden, *args[1:]), kwargs) if args else \
                ((), {**kwargs, "hidden_states": hidden})
    out.append((args, kwargs))  # the last block's output
    return out


def _is_cache(value) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(value).__mro__)


def reconstruct_block(block: nn.Module, inputs: Sequence[BlockInput],
                      formats: dict[str, str], steps: int = 200, lr: float | None = None,
                      batch: int = 4, seed: int = 0,
                      targets: Sequence[torch.Tensor] | None = None,
                      base: dict[str, torch.Tensor] | None = None,
                      packed: dict[str, torch.Tensor] | None = None,
                      start: dict[str, torch.Tensor] | None = None,
                      holdout: int = 0, learn_scales: bool = True) -> Reconstructed:
    """Learn the rounding of `block`'s weights named in `formats` (parameter name -> grid
    format) so the block's output on `inputs` (from `block_inputs`) matches `targets` (default:
    the float block's output on the same inputs; a whole model passes the float block's output
    on the float stream's inputs while `inputs` come from the quantized blocks before). `steps` signed-gradient steps over mini-batches of `batch` inputs, learning rate
    `lr` (default 1 / steps, AutoRound's) decayed linearly; the offsets with the lowest loss
    on all inputs are kept. `base`: the float weights the grids are made from (default: the
    block's own; a block holding quantized weights passes its base ones). A K-quant weight
    (q2_K ... q6_K) needs `packed[name]`, its post-training blocks: codes are learned onto their
    scales, starting at their codes, and `Reconstructed.packed` holds the new blocks. `start`:
    post-training weights of the other formats to start from (default RTN). `holdout`: the
    last `holdout` inputs are never learned on; the offsets kept are those with the lowest
    loss on them, the start included (early stopping: a block never ends worse than it started
    on windows it did not learn). `learn_scales`: a llama.cpp block's stored float16 scale and
    minimum (q4_0 ... q8_0 and the K-quants' d and dmin; the K-quants' 6-bit sub-block scales
    stay) are learned too, each within SCALE_RANGE of the quantizer's, by the same signed
    steps (AutoRound's learned min/max scaling, onto the fields the format holds); the int*
    grids keep the scales their rule derives. `block` is left as it was."""
    params = dict(block.named_parameters())
    unknown = [n for n in formats if n not in params]
    if unknown:
        raise KeyError(f"no parameter {unknown[0]!r} in this block")
    base = base or {}
    lacking = [n for n, fmt in formats.items() if (fmt in LATTICE_CODES or fmt in CODES
                                                   and fmt not in LEGACY_CODES)
               and n not in (packed or {})]
    if lacking:
        raise ValueError(f"{lacking[0]}: a K-quant or i-quant is learned onto the scales its "
                         "quantizer "
                         "chose: pass its post-training blocks in `packed`")
    grids = {n: _LatticeWeight.of(base.get(n, params[n]), fmt, packed[n])
             if fmt in LATTICE_CODES
             else _KWeight.of(base.get(n, params[n]), fmt, (packed or {})[n])
             if fmt in CODES and n in (packed or {})
             else _Weight.of(base.get(n, params[n]), fmt, (start or {}).get(n))
             for n, fmt in formats.items()}
    lr = 1.0 / max(1, steps) if lr is None else lr
    trainable = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():  # only the offsets learn
        p.requires_grad_(False)
    try:
        return _learn(block, inputs, grids, steps, lr, batch, seed, targets, holdout,
                      learn_scales)
    finally:
        for n, p in params.items():
            p.requires_grad_(trainable[n])


def _learn(block: nn.Module, inputs: Sequence[BlockInput], grids: dict[str, _Weight],
           steps: int, lr: float, batch: int, seed: int,
           targets: Sequence[torch.Tensor] | None, holdout: int = 0,
           learn_scales: bool = True) -> Reconstructed:
    dtypes = {n: p.dtype for n, p in block.named_parameters()}
    # weights made under inference mode (a cache's dequantized variants) cannot take part in
    # a graph: the ones not learned go in as ordinary copies
    fixed = {n: p.detach().clone() for n, p in block.named_parameters()
             if n not in grids and p.is_inference()}
    if targets is None:
        with torch.no_grad():
            targets = [_output(block(*a, **k)).detach().float() for a, k in inputs]

    def loss_on(idx: Sequence[int], ws: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for part in _batches(inputs, idx):  # windows of one length run as one batch
            a, k = _stacked(inputs, part)
            ws = {**fixed, **{n: w.to(dtypes[n]) for n, w in ws.items()}}
            out = _output(torch.func.functional_call(block, ws, a, k)).float()
            want = torch.cat([targets[i] for i in part])
            total = total + torch.mean((out - want) ** 2) * len(part)
        return total / len(idx)

    # each weight's code is RTN's either side of it (AutoRound's [-0.5, 0.5] around RTN) or
    # the post-training code learning starts at (_box); with
    # `learn_scales`, each block's stored scale (and minimum) within SCALE_RANGE of its own
    v = {n: g.v0.clone().requires_grad_(True) for n, g in grids.items()}
    box = {n: _box(g) for n, g in grids.items()}
    sc = {n: torch.zeros(g.scales, device=g.w.device, requires_grad=True)
          for n, g in grids.items() if learn_scales and g.scales is not None}

    def on_grid(vs, ss) -> dict[str, torch.Tensor]:
        return {n: g.quantized(vs[n], ss.get(n)) for n, g in grids.items()}

    if not 0 <= holdout < len(inputs):
        raise ValueError(f"holdout {holdout} must leave inputs to learn on ({len(inputs)})")
    learn = list(range(len(inputs) - holdout))
    judge = list(range(len(inputs) - holdout, len(inputs))) if holdout else learn
    with torch.no_grad():
        best = rtn = float(loss_on(judge, on_grid(v, {})))
    best_v = {n: t.detach().clone() for n, t in v.items()}
    best_s = {n: t.detach().clone() for n, t in sc.items()}
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = [learn[i] for i in torch.randperm(len(learn), generator=gen)[:batch].tolist()]
        loss = loss_on(idx, on_grid(v, sc))
        for t in (*v.values(), *sc.values()):
            t.grad = None
        loss.backward()
        rate = lr * (1 - step / steps)
        with torch.no_grad():
            for n, t in v.items():
                t.sub_(rate * torch.sign(t.grad))
                torch.maximum(torch.minimum(t, box[n][1]), box[n][0], out=t)
            for t in sc.values():  # signed steps too, smaller (a scale moves a whole block)
                t.sub_(rate * SCALE_STEP * torch.sign(t.grad)).clamp_(-SCALE_RANGE, SCALE_RANGE)
            if (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
                now = float(loss_on(judge, on_grid(v, sc)))
                if now < best:
                    best, best_v = now, {n: t.detach().clone() for n, t in v.items()}
                    best_s = {n: t.detach().clone() for n, t in sc.items()}
    weights = {n: g.exact(best_v[n], best_s.get(n)) for n, g in grids.items()}
    with torch.no_grad():
        final = float(loss_on(judge, weights))
    return Reconstructed(weights, rtn, final, steps,
                         {n: g.out for n, g in grids.items() if not isinstance(g, _Weight)})


def _box(g) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of a weight's offsets: its code may be the start's, or RTN's either side of the
    weight (AutoRound's choice between rounding down and up), and nothing past them; bounds
    EDGE inside the half-way points, so which code a bound gives does not hang on rounding.
    A lattice weight's own (it has no per-weight code)."""
    if hasattr(g, "box"):
        return g.box()
    x = g.index()
    q = torch.round(x + g.v0)
    lo = torch.minimum(torch.floor(x), q) - 0.5 + EDGE
    hi = torch.maximum(torch.ceil(x), q) + 0.5 - EDGE
    return lo - x, hi - x


def _batches(inputs: Sequence[BlockInput], idx: Sequence[int], most: int = 8) -> list[list[int]]:
    """`idx` in groups of up to `most` whose hidden states have one shape (a window length)."""
    groups: dict[tuple, list[list[int]]] = {}
    for i in idx:
        runs = groups.setdefault(tuple(_hidden(inputs[i]).shape), [[]])
        if len(runs[-1]) == most:
            runs.append([])
        runs[-1].append(i)
    return [r for runs in groups.values() for r in runs]


def _stacked(inputs: Sequence[BlockInput], part: Sequence[int]) -> BlockInput:
    """One call for the windows `part`: their hidden states stacked on the batch axis, the
    rest (positions, rotary tables: the same for windows of one length) of the first."""
    args, kwargs = inputs[part[0]]
    if len(part) == 1:
        return args, kwargs
    hidden = torch.cat([_hidden(inputs[i]) for i in part])
    return ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})


def _next(block: nn.Module, inputs: Sequence[BlockInput],
          weights: dict[str, torch.Tensor] | None = None) -> list[BlockInput]:
    """The inputs of the next block: `block` (with `weights` swapped in) run on `inputs`."""
    dtypes = {n: p.dtype for n, p in block.named_parameters()}
    out = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = _output(torch.func.functional_call(block, {
                n: w.to(dtypes[n]) for n, w in (weights or {}).items()}, args, kwargs))
            out.append(((y, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": y}))
    return out


def _hidden(inp: BlockInput) -> torch.Tensor:
    args, kwargs = inp
    return args[0] if args else kwargs["hidden_states"]


def reconstruct_model(layers: Sequence[nn.Module], first_inputs: Sequence[BlockInput],
                      formats: Sequence[dict[str, str]], steps: int = 200, batch: int = 4,
                      seed: int = 0, progress: Callable[[int], None] | None = None,
                      base: Sequence[dict[str, torch.Tensor]] | None = None,
                      float_inputs: Sequence[BlockInput] | None = None,
                      packed: Sequence[dict[str, torch.Tensor]] | None = None,
                      start: Sequence[dict[str, torch.Tensor]] | None = None,
                      holdout: int = 0, learn_scales: bool = True,
                      ) -> tuple[list[dict[str, torch.Tensor]], list[Reconstructed]]:
    """Every block of `layers` in turn, AutoRound's way: block i learns on the inputs the
    already reconstructed blocks 0..i-1 give (so it corrects the error they leave) towards the
    float block's output on the float stream. `first_inputs`: block 0's inputs, one per
    calibration window (`block_inputs(...)[0]` of each); `formats[i]`: block i's parameter
    name -> grid format. Returns each block's weights and reports; `layers` are unchanged.

    A model whose blocks hold a candidate's quantized weights passes `base[i]` (block i's
    float weights of every quantized tensor: the float stream runs on them and the grids are
    made from them; the tensors not learned stay as the block holds them) and `float_inputs`
    (block 0's inputs from the float model, when they differ: a quantized embedding), and may
    pass `start[i]` (the post-training weights to start from). `holdout`: the last windows,
    never learned on, choose each block's offsets (see reconstruct_block)."""
    fp, q = list(float_inputs or first_inputs), list(first_inputs)
    weights, reports = [], []
    for i, block in enumerate(layers):
        b = base[i] if base is not None else None
        nxt_fp = _next(block, fp, b)
        got = reconstruct_block(block, q, formats[i], steps=steps, batch=batch, seed=seed + i,
                                targets=[_hidden(x).float() for x in nxt_fp], base=b,
                                packed=packed[i] if packed is not None else None,
                                start=start[i] if start is not None else None, holdout=holdout,
                                learn_scales=learn_scales)
        q = _next(block, q, got.weights)
        fp = nxt_fp
        weights.append(got.weights)
        reports.append(got)
        if progress is not None:
            progress(i)
    return weights, reports
