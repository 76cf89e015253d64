"""Recovery methods (docs/recovery.md): a registry of how a candidate's weights are learned
back towards the base model, chosen per candidate by what it changed and by the round (a
ladder: later rounds continue from what earlier ones kept with a costlier method). Each
method's `run(bench, recipe, windows, steps, seed, progress, holdout, start)` returns
(fqn -> float32 weight, exact); search/recover.py runs them after the trials and decides what
a point keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import numpy as np
import torch

from llmpareto.recipe import Recipe

PACKED = "packed:"  # key prefix of a K-quant's learned blocks next to its weights


@dataclass(frozen=True)
class Method:
    """A recovery method: which candidates it handles (by what they changed) and how it
    learns their weights. `run(bench, recipe, windows, steps, seed, progress, holdout, start)`
    returns (fqn -> float32 weight, exact): `exact` weights lie on their formats' grids
    already; `holdout` (calibration windows never learned on) may serve early stopping;
    `start`, (weights, exact) as an earlier round kept them (`PACKED` keys included), is where
    learning starts instead of the post-training point."""

    name: str
    what: str
    handles: Callable[[object, Recipe], bool]
    run: Callable[..., tuple[dict[str, torch.Tensor], bool]]


def _changes_structure(bench, recipe: Recipe) -> bool:
    return bool({k: v for k, v in recipe.structure.items() if v is not None}) or any(
        sp is not None for sp in bench.arch.sparsity_for(recipe).values())


def _grid_tensors(bench, recipe: Recipe) -> dict[str, str]:
    """Block tensors in a format block-wise reconstruction learns: fqn -> format (the
    per-group grids GPTQ rounds onto, and the K-quants, 4-bit and 2-bit lattice i-quants onto
    the scales llama.cpp chose)."""
    from llmpareto.compress.gptq import GRIDS
    from llmpareto.compress.kquant_codes import CODES
    from llmpareto.compress.lattice_codes import LATTICE_CODES

    formats = bench.arch.formats_for(recipe)
    return {t.fqn: formats[t.fqn] for t in bench.arch.linears
            if t.layer is not None and any(formats.get(t.fqn) in g
                                           for g in (GRIDS, CODES, LATTICE_CODES))
            and not holds_exactly(bench.cache, t.fqn, formats[t.fqn])}


# Relative to the tensor's largest weight: float32 rounding of the same value computed two ways
# is ~1e-7; the coarsest real quantization error of these grids (q8_0) is ~1e-3.
EXACT_RTOL = 1e-6
_exact_memo: WeakKeyDictionary = WeakKeyDictionary()


def holds_exactly(cache, fqn: str, fmt: str) -> bool:
    """Whether `fmt` reproduces the base weights of `fqn` (a model published quantized, such
    as the default model's Q4_1 blocks in q5_1). Such a tensor has nothing to recover: learning
    it would only trade its exactness for compensating other tensors' errors on the
    calibration text, which did not carry to another domain (docs/recovery.md). A tensor an
    earlier round learned is not exact."""
    if fqn in cache.override:
        return False
    memo = _exact_memo.setdefault(cache, {})
    if (fqn, fmt) not in memo:
        base = cache.base[fqn]
        q = cache.dequantized(fqn, fmt)
        # in the precision the model runs in: a bfloat16 model holds the codes' values
        # rounded to bfloat16, which a float32 compare would call 2**-9 apart
        err = float((q.to(base.dtype).float() - base.to(q.device).float()).abs().max())
        memo[(fqn, fmt)] = err <= EXACT_RTOL * float(base.abs().max())
    return memo[(fqn, fmt)]


Start = tuple[dict[str, torch.Tensor], bool]  # weights an earlier round kept, and their `exact`


def _ids(windows: np.ndarray, holdout: np.ndarray | None) -> tuple[int, torch.Tensor]:
    """(how many held-out windows, every window's token ids: learned ones, then held out)."""
    held = 0 if holdout is None else len(holdout)
    return held, torch.as_tensor(windows if not held else np.concatenate([windows, holdout]))


def _states(model, ids: torch.Tensor, n: int | None = None) -> list:
    """Per window, the inputs of the model's first `n` blocks (all, and the stack's output,
    when None) as it runs that window (compress.reconstruct.block_inputs)."""
    from llmpareto.arch import _find_layers
    from llmpareto.compress.reconstruct import block_inputs

    layers = list(_find_layers(model))[:n]
    dev = next(model.parameters()).device
    return [block_inputs(layers, lambda i=i: model(input_ids=ids[i:i + 1].to(dev),
                                                   use_cache=False))
            for i in range(len(ids))]


def _reconstruct(bench, recipe: Recipe, windows: np.ndarray, steps: int, seed: int,
                 progress: bool, holdout: np.ndarray | None = None, start: Start | None = None,
                 ) -> tuple[dict[str, torch.Tensor], bool]:
    """Block-wise reconstruction (compress.reconstruct) of the candidate's grid tensors, each
    block against the base block's output, starting at the post-training codes (the run's
    quantizer's) or at `start`'s (its blocks, or its weights' nearest codes on an int* grid);
    the other tensors stay as the candidate has them. `holdout`: calibration windows never
    learned on that choose each block's offsets (early stopping)."""
    from tqdm.auto import tqdm

    from llmpareto.arch import _find_layers
    from llmpareto.compress import apply
    from llmpareto.compress.reconstruct import reconstruct_model

    model, cache = bench.model, bench.cache
    layers = list(_find_layers(model))
    learn = _grid_tensors(bench, recipe)
    formats = bench.arch.formats_for(recipe)
    from llmpareto.compress.kquant_codes import CODES
    from llmpareto.compress.lattice_codes import LATTICE_CODES

    kept = start[0] if start is not None else {}
    by_block: list[dict[str, str]] = [{} for _ in layers]
    base: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    packed: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    first: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    name_of = {}
    for t in bench.arch.linears:
        if t.layer is None or formats.get(t.fqn) is None:
            continue
        name = t.fqn.split(f"layers.{t.layer}.", 1)[1] + ".weight"
        param = model.get_submodule(t.fqn).weight
        base[t.layer][name] = cache.source(t.fqn).to(param.device, torch.float32)
        if t.fqn in learn:
            by_block[t.layer][name] = learn[t.fqn]
            name_of[(t.layer, name)] = t.fqn
            if learn[t.fqn] in CODES or learn[t.fqn] in LATTICE_CODES:  # learned onto the
                # scales the run's quantizer chose, from its codes (K-quants, i-quants,
                # llama.cpp's legacy blocks), or the blocks an earlier round kept
                packed[t.layer][name] = kept[PACKED + t.fqn] if PACKED + t.fqn in kept else \
                    torch.from_numpy(cache.get(t.fqn, learn[t.fqn]))
            else:  # int*: from the codes nearest the run's quantizer's (or kept), not RTN
                first[t.layer][name] = (kept[t.fqn] if t.fqn in kept else cache.dequantized(
                    t.fqn, learn[t.fqn])).to(param.device, torch.float32)
    held, ids = _ids(windows, holdout)
    apply(model, Recipe(), cache)
    float_in = [s[0] for s in _states(model, ids, 1)]
    apply(model, recipe, cache)
    q_in = [s[0] for s in _states(model, ids, 1)]
    with tqdm(total=len(layers), desc="reconstructing blocks", unit="block", leave=False,
              disable=not progress) as bar:
        got, reports = reconstruct_model(layers, q_in, by_block, steps=steps, seed=seed,
                                         progress=lambda i: bar.update(1), base=base,
                                         float_inputs=float_in, packed=packed,
                                         start=first, holdout=held)
    out = {}
    for i, block in enumerate(got):
        for name, w in block.items():
            fqn = name_of[(i, name)]
            out[fqn] = w.detach().to("cpu", torch.float32).contiguous()
            if name in reports[i].packed:  # the blocks themselves, to be written as they are
                out[PACKED + fqn] = reports[i].packed[name].to("cpu").contiguous()
    return out, True


def set_start(bench, recipe: Recipe, weights: dict[str, torch.Tensor], exact: bool) -> None:
    """Make `weights` (recovered; `PACKED` keys: their blocks) the source of the candidate's
    tensors in `bench`'s cache, until `bench.cache.set_override({})`."""
    plain = {k: v for k, v in weights.items() if not k.startswith(PACKED)}
    packed = {k.removeprefix(PACKED): v.numpy() for k, v in weights.items() if k.startswith(PACKED)}
    formats = bench.cache.arch.formats_for(recipe)
    bench.cache.set_override(plain, exact=exact,
                             packed={f: (formats[f], b) for f, b in packed.items()})


def _trained(built) -> dict[str, torch.Tensor]:
    """The float weights training left in the model, its cache told they changed."""
    built.model.requires_grad_(False)
    built.cache.current.update(dict.fromkeys(built.formats, "?"))  # trained: set again
    return {fqn: built.cache.weight(fqn).detach().to("cpu", torch.float32).clone().contiguous()
            for fqn in built.formats}


def _distill(bench, recipe: Recipe, windows: np.ndarray, steps: int, seed: int,
             progress: bool, holdout: np.ndarray | None = None, start: Start | None = None,
             qat: bool = False) -> tuple[dict[str, torch.Tensor], bool]:
    """End-to-end distillation from the base model with soft targets only (the survey's loss
    with alpha = 0), the candidate's cut and pruned float weights (or `start`'s) as the start;
    with `qat` the recipe's formats are applied in every forward pass (straight-through)."""
    from llmpareto.compress.distill import distill
    from llmpareto.models import load_model
    from llmpareto.search.distill_run import _student_start

    if start is not None:
        set_start(bench, recipe, *start)
    try:
        built = bench.build(recipe)
        masks, formats, _ = _student_start(built)
        if qat:  # a tensor its format holds exactly has nothing to learn (holds_exactly)
            c = bench.cache
            for fqn, fmt in built.formats.items():
                if fmt and not c.current_sparsity[fqn] and c.current_slice[fqn] is None \
                        and holds_exactly(c, fqn, fmt):
                    c.weight(fqn).requires_grad_(False)
        teacher, _ = load_model(bench.source, bench.placement)
        try:
            distill(built.model, teacher, windows, steps, lr=1e-4, batch_size=4, alpha=0.0,
                    keep_zero=masks, qat_formats=formats if qat else None, progress=progress,
                    seed=seed)
        finally:
            del teacher
            out = _trained(built)
    finally:
        bench.cache.set_override({})
    return out, False


def _local(bench, recipe: Recipe, windows: np.ndarray, steps: int, seed: int,
           progress: bool, holdout: np.ndarray | None = None, start: Start | None = None,
           ) -> tuple[dict[str, torch.Tensor], bool]:
    """Blockwise local distillation (compress.local_distill): each kept block, with its cut
    and pruned float weights (or `start`'s) as the start, learns on the base model's hidden state where it
    starts to give the base's hidden state where the next kept block starts; `steps` steps a
    block, held-out windows keep each block's best weights. Re-quantized by the run's
    quantizer afterwards, as end-to-end distillation is."""
    from tqdm.auto import tqdm

    from llmpareto.arch import _find_layers
    from llmpareto.compress import apply
    from llmpareto.compress.local_distill import distill_blocks
    from llmpareto.search.distill_run import _student_start

    model, cache = bench.model, bench.cache
    held, ids = _ids(windows, holdout)
    apply(model, Recipe(), cache)
    states = _states(model, ids)
    if start is not None:  # after the base's states: the override replaces base weights too
        set_start(bench, recipe, *start)
    try:
        built = bench.build(recipe)
        masks, _, _ = _student_start(built)
        kept = recipe.structure.get("layers") or list(range(len(states[0]) - 1))
        blocks = list(_find_layers(model))
        where = {id(m): n for n, m in model.named_modules()}
        block_masks = []
        for b in blocks:
            pre = where[id(b)] + "."
            block_masks.append({k[len(pre):] + ".weight": m for k, m in masks.items()
                                if k.startswith(pre)})
        try:
            with tqdm(total=len(blocks), desc="distilling blocks", unit="block", leave=False,
                      disable=not progress) as bar:
                distill_blocks(blocks, kept, states, steps, seed=seed, holdout=held,
                               masks=block_masks, progress=lambda j: bar.update(1))
        finally:
            out = _trained(built)
    finally:
        bench.cache.set_override({})
    return out, False


def _refit(bench, recipe: Recipe, windows: np.ndarray, steps: int, seed: int,
           progress: bool, holdout: np.ndarray | None = None, start: Start | None = None,
           ) -> tuple[dict[str, torch.Tensor], bool]:
    """Least-squares refit (compress.refit): on the student's own stream, each kept block's
    attention output projection solved in closed form towards the base block's residual after
    its attention, then its MLP down-projection towards the base model's hidden state where the
    next kept block starts; held-out windows choose each solve's ridge. `steps` is not used
    (nothing iterates). Re-quantized by the run's quantizer afterwards, as distillation is."""
    from llmpareto.arch import _find_layers
    from llmpareto.compress import apply
    from llmpareto.compress.local_distill import spans
    from llmpareto.compress.refit import after_attention, hidden_targets, refit_blocks
    from llmpareto.search.distill_run import _student_start

    model, cache = bench.model, bench.cache
    held, ids = _ids(windows, holdout)
    apply(model, Recipe(), cache)
    teacher = _states(model, ids)
    n_blocks = len(teacher[0]) - 1
    kept = recipe.structure.get("layers") or list(range(n_blocks))
    targets = hidden_targets(teacher, [dst for _, dst in spans(kept, n_blocks)])
    attn = None  # each kept block's attention output towards the base block's, where it has one
    if any(t.kind == "self_attn.o_proj" for t in bench.arch.linears):
        base_blocks = list(_find_layers(model))
        per_block = [after_attention(base_blocks[k], [w[k] for w in teacher]) for k in kept]
        attn = [[per_block[j][w] for j in range(len(kept))] for w in range(len(teacher))]
    del teacher
    if start is not None:  # after the base's states: the override replaces base weights too
        set_start(bench, recipe, *start)
    try:
        built = bench.build(recipe)
        _student_start(built)
        first = [s[0] for s in _states(model, ids, 1)]
        try:
            refit_blocks(list(_find_layers(model)), first, targets, holdout=held,
                         attn_targets=attn)
        finally:
            out = _trained(built)
    finally:
        bench.cache.set_override({})
    return out, False


def _refittable(bench, recipe: Recipe) -> bool:
    """Whether a least-squares refit can recover `recipe`: a student (its structure changed)
    with MLP down-projections, none of the projections it solves (those and the attention
    outputs) pruned (a dense solve would fill their zeros)."""
    if not {k: v for k, v in recipe.structure.items() if v is not None}:
        return False
    sparsity = bench.arch.sparsity_for(recipe)
    solved = [t for t in bench.arch.restructure(recipe.structure).linears
              if t.kind in ("mlp.down_proj", "self_attn.o_proj")]
    return any(t.kind == "mlp.down_proj" for t in solved) and not any(
        t.fqn in sparsity for t in solved)


def _quantized(fmt: str | None) -> bool:
    from llmpareto.formats import get_format

    return fmt is not None and get_format(fmt).bits_per_weight < 16


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("reconstruct", "block-wise reconstruction: rounding learned per block against the "
           "base block's output, on the format's own grid (q4_0, q4_1, q5_0, q5_1, q8_0, int*; "
           "q2_K ... q6_K, iq4_nl, iq4_xs onto the scales llama.cpp's quantizer chose)",
           lambda bench, r: not _changes_structure(bench, r) and bool(_grid_tensors(bench, r)),
           _reconstruct),
    Method("refit", "least-squares refit: each kept block's attention output and MLP "
           "down-projections solved in closed form towards the base's residual after that "
           "block's attention and its hidden state where the next kept block starts",
           _refittable, _refit),
    Method("local", "blockwise local distillation: each kept block learns, on the base's "
           "hidden states, what the base's blocks up to the next kept one give",
           lambda bench, r: _changes_structure(bench, r), _local),
    Method("distill", "end-to-end distillation from the base model, soft targets only",
           lambda bench, r: True, _distill),
    Method("qat", "end-to-end distillation through the recipe's formats (straight-through)",
           lambda bench, r: any(_quantized(f) for f in bench.arch.formats_for(r).values()),
           lambda *a, **k: _distill(*a, **k, qat=True)),
)}


# auto's ladders: the method of round r is the ladder's r-th (its last for the rounds after),
# continuing from the weights the rounds before kept
# (the refit is not a student's first rung: distillation from its weights carried less to
# another domain than distillation from the cut weights, docs/recovery.md)
LADDERS = {"structure": ("distill",), "quantized": ("reconstruct", "qat")}


def choose_method(bench, recipe: Recipe, asked: str = "auto", rung: int = 0) -> str | None:
    """The method for a candidate in round `rung`: `asked` when it handles it; with auto, the
    rung's method of its ladder: end-to-end distillation for a student or pruned candidate
    (on the default model it beat blockwise local distillation at equal steps and seconds,
    and carried further to another domain than the least-squares refit or distillation from
    the refit's weights: docs/recovery.md); for a
    quantized one block-wise reconstruction, then quantization-aware training from the
    reconstructed weights (the survey's last, most expensive rung); None when nothing here
    can recover it (e.g. only tq2_0 ternary blocks, whose grid is not covered)."""
    if asked != "auto":
        return asked if REGISTRY[asked].handles(bench, recipe) else None
    if _changes_structure(bench, recipe):
        ladder = LADDERS["structure"]
    elif REGISTRY["reconstruct"].handles(bench, recipe):
        ladder = LADDERS["quantized"]
    else:
        return None
    return ladder[min(rung, len(ladder) - 1)]
