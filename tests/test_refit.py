"""Least-squares refit (compress/refit.py, issue 26): a student's attention output and MLP
down-projections solved in closed form towards the base model's hidden states, a recovery
method asked by name (`--recover-method refit`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn


def _states(bench) -> list:
    from llmpareto.arch import _find_layers
    from llmpareto.compress import apply
    from llmpareto.compress.reconstruct import block_inputs
    from llmpareto.recipe import Recipe

    ids = torch.as_tensor(bench.windows.calib)  # 32 windows of 64 tokens
    apply(bench.model, Recipe(), bench.cache)
    return [block_inputs(list(_find_layers(bench.model)),
                         lambda i=i: bench.model(input_ids=ids[i:i + 1], use_cache=False))
            for i in range(len(ids))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_refit_finds_the_down_projection_that_made_the_targets(bench4, dtype):
    """A real Llama block whose targets were made by another down-projection W*: the refit,
    from the block's own weight, lands on W* (2048 tokens for 4x fewer channels: the solve is
    determined; the ridge, chosen on held-out windows, is the weakest tried) and the held-out
    error drops to rounding. In bfloat16 (a GPU run) too: measured on a float32 copy, not
    skipped as if bfloat16's rounding were a norm after the MLP."""
    import copy

    from llmpareto.arch import _find_layers
    from llmpareto.compress.reconstruct import _output
    from llmpareto.compress.refit import RIDGES, refit_block

    states = _states(bench4)
    block = list(_find_layers(bench4.model))[1]
    w0 = block.mlp.down_proj.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    w_star = w0 + 0.5 * w0.std() * torch.randn(w0.shape, generator=gen)
    inputs = [s[1] for s in states]
    with torch.no_grad():
        targets = [_output(torch.func.functional_call(
            block, {"mlp.down_proj.weight": w_star}, *x)) for x in inputs]
    if dtype != torch.float32:
        block = copy.deepcopy(block).to(dtype)
        inputs = [_cast(x, dtype) for x in inputs]
    try:
        got = refit_block(block, inputs, targets, holdout=8)
        w = block.mlp.down_proj.weight.detach().float().clone()
    finally:
        with torch.no_grad():
            block.mlp.down_proj.weight.copy_(w0)
    assert got.ridge is not None, got
    if dtype == torch.float32:
        assert got.ridge == RIDGES[0], got
        assert float((w - w_star).norm() / (w0 - w_star).norm()) < 0.02  # ~3e-3 here
        assert got.mse < 1e-3 * got.mse_start, got
    else:  # bfloat16's inputs and stored weight: a few percent of the way
        assert float((w - w_star).norm() / (w0 - w_star).norm()) < 0.1, got
        assert got.mse < 0.05 * got.mse_start, got


def test_refit_finds_the_attention_output_projection_that_made_the_targets(bench4):
    """With targets for the residual after attention made by another output projection W*_o
    (and the block's output with it), the attention stage lands on W*_o before the
    down-projection is solved; the down-projection, right already, stays close."""
    from llmpareto.arch import _find_layers
    from llmpareto.compress.reconstruct import _output
    from llmpareto.compress.refit import after_attention, refit_block

    states = _states(bench4)
    block = list(_find_layers(bench4.model))[2]
    o0 = block.self_attn.o_proj.weight.detach().clone()
    d0 = block.mlp.down_proj.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    o_star = o0 + 0.5 * o0.std() * torch.randn(o0.shape, generator=gen)
    inputs = [s[2] for s in states]
    with torch.no_grad():
        block.self_attn.o_proj.weight.copy_(o_star)
        attn_targets = after_attention(block, inputs)
        targets = [_output(block(*a, **k)) for a, k in inputs]
        block.self_attn.o_proj.weight.copy_(o0)
    try:
        got = refit_block(block, inputs, targets, holdout=8, attn_targets=attn_targets)
        o, d = (block.self_attn.o_proj.weight.detach().clone(),
                block.mlp.down_proj.weight.detach().clone())
    finally:
        with torch.no_grad():
            block.self_attn.o_proj.weight.copy_(o0)
            block.mlp.down_proj.weight.copy_(d0)
    assert got.attention is not None and got.attention.ridge is not None, got
    assert float((o - o_star).norm() / (o0 - o_star).norm()) < 0.02
    assert float((d - d0).norm() / d0.norm()) < 0.02
    assert got.attention.mse < 1e-3 * got.attention.mse_start, got


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


class _Block(nn.Module):
    """A block in Llama's shape (`mlp.down_proj`), its MLP output added to the residual stream
    as it is, or through a norm (as Gemma 2's post-feed-forward norm)."""

    def __init__(self, post_norm: bool) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up_proj, self.mlp.down_proj = nn.Linear(8, 32, bias=False), nn.Linear(32, 8, bias=False)
        self.post = nn.LayerNorm(8) if post_norm else nn.Identity()

    def forward(self, hidden_states):
        return hidden_states + self.post(self.mlp.down_proj(torch.relu(self.mlp.up_proj(
            hidden_states))))


@pytest.mark.parametrize("post_norm", [False, True])
def test_refit_never_ends_worse_on_held_out_windows_and_leaves_a_post_norm_block(post_norm):
    """Targets unrelated to the block: the refit keeps its held-out error at or below the
    start (the current weight competes); a block whose MLP output passes a norm is not linear
    in its down-projection and is left exactly as it was."""
    from llmpareto.compress.refit import refit_block

    torch.manual_seed(0)
    block = _Block(post_norm)
    inputs = [((torch.randn(1, 16, 8),), {}) for _ in range(6)]
    targets = [torch.randn(1, 16, 8) for _ in inputs]
    w0 = block.mlp.down_proj.weight.detach().clone()
    got = refit_block(block, inputs, targets, holdout=2)
    if post_norm:
        assert got.ridge is None and np.isnan(got.mse)
        assert torch.equal(block.mlp.down_proj.weight, w0)
    else:
        assert got.mse <= got.mse_start
        assert not torch.equal(block.mlp.down_proj.weight, w0) or got.ridge is None


def _student(sparse_down: bool = False):
    from llmpareto.recipe import Recipe

    r = Recipe({"re:.*down_proj": {"format": "f16", "sparsity": 0.5}} if sparse_down else {})
    r.structure = {"layers": [0, 2, 3], "mlp_ratio": 0.5, "heads": None}
    return r


def test_the_refit_is_asked_by_name_for_a_student_and_never_for_a_pruned_one(bench4):
    """`--recover-method refit`: a student; not a pruned one (a dense solve would fill a
    pruned down-projection's zeros), nor a candidate that cuts nothing. `auto` distills a
    student (the refit carried less to another domain: docs/recovery.md)."""
    from llmpareto.recipe import Recipe
    from llmpareto.search.recover_methods import choose_method

    assert choose_method(bench4, _student(), "refit") == "refit"
    assert choose_method(bench4, _student(), "refit", rung=1) == "refit"
    assert choose_method(bench4, _student()) == "distill"
    assert choose_method(bench4, _student(sparse_down=True), "refit") is None
    assert choose_method(bench4, _student(sparse_down=True)) == "distill"
    assert choose_method(bench4, Recipe.uniform("q8_0"), "refit") is None  # nothing cut


PER_BLOCK = {"layers": [0, 2, 3], "mlp_ratio": [0.5, 1.0, 0.75], "heads": [1, 2, 1]}


@pytest.mark.parametrize("per_block", [False, True], ids=["homogeneous", "per-block"])
def test_the_registry_refits_a_student_and_lowers_kl_where_it_never_learned(bench4, per_block):
    """`refit` on the workbench: the student's KL to the base on the evaluation windows (never
    learned on, nor held out) drops; the weights are float (re-quantized afterwards) and only
    the attention output and MLP down-projections change."""
    from llmpareto.compress import apply
    from llmpareto.evaluators.quality import log_probs64, logits_of, text_scores
    from llmpareto.recipe import Recipe
    from llmpareto.search.distill_run import _student_start
    from llmpareto.search.recover import use_recovered
    from llmpareto.search.recover_methods import REGISTRY

    bench, student = bench4, _student()
    if per_block:  # each block its own MLP width and KV groups (issue 27's students)
        student.structure = dict(PER_BLOCK)
    ev = bench.windows.eval
    apply(bench.model, Recipe(), bench.cache)
    base = log_probs64(logits_of(bench.model, ev, 4))
    built = bench.build(student)
    before = float(text_scores(bench.model, ev, base, 4)["kl_nats"])
    _student_start(built)  # the cut float weights, to compare with
    start = {f: bench.cache.weight(f).detach().float().clone() for f in built.formats}
    bench.model.requires_grad_(False)
    bench.cache.current.update(dict.fromkeys(built.formats, "?"))
    calib = bench.windows.calib
    weights, exact = REGISTRY["refit"].run(bench, student, calib[:26], 0, 0, False, calib[26:])
    assert exact is False
    changed = {f for f in weights if not torch.equal(weights[f], start[f])}
    assert {f.rsplit(".", 2)[-2] + "." + f.rsplit(".", 1)[-1] for f in changed} == {
        "mlp.down_proj", "self_attn.o_proj"}, changed
    try:
        use_recovered(bench, student, weights, exact)
        after = float(text_scores(bench.model, ev, base, 4)["kl_nats"])
    finally:
        bench.cache.set_override({})
    assert after < 0.9 * before, (before, after)

