"""Blockwise local distillation (issue 26): each kept block of a student learns, on the teacher's
hidden states, what the teacher's blocks up to the next kept one give; a method of the
recovery registry for students and pruned points."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _student():
    from llmpareto.recipe import Recipe

    r = Recipe.uniform("f16")
    r.structure = {"layers": [0, 2, 3], "mlp_ratio": 0.5, "heads": None}
    return r


def _kl(bench, windows, base) -> float:
    from llmpareto.evaluators.quality import text_scores

    return float(text_scores(bench.model, windows, base, 4)["kl_nats"])


def _base_log_probs(bench, windows):
    from llmpareto.compress import apply
    from llmpareto.evaluators.quality import log_probs64, logits_of
    from llmpareto.recipe import Recipe

    apply(bench.model, Recipe(), bench.cache)
    return log_probs64(logits_of(bench.model, windows, 4))


def test_spans_map_each_kept_block_to_the_teacher_span_it_stands_for():
    from llmpareto.compress.local_distill import spans

    assert spans([0, 2, 3], 4) == [(0, 2), (2, 3), (3, 4)]
    assert spans([1], 4) == [(1, 4)]
    for bad in ([2, 1], [0, 0], [], [0, 4]):
        with pytest.raises(ValueError):
            spans(bad, 4)


def test_each_block_learns_its_span_and_never_ends_worse_on_held_out_windows(bench4):
    """Pure functions on the workbench's model: the kept blocks of a cut, narrowed student get
    a lower output error against the teacher's span on windows they never learned on, and a
    pruned weight's zeros stay zeros."""
    from llmpareto.arch import _find_layers
    from llmpareto.compress import apply
    from llmpareto.compress.local_distill import distill_blocks
    from llmpareto.compress.reconstruct import block_inputs
    from llmpareto.recipe import Recipe
    from llmpareto.search.distill_run import _student_start

    bench = bench4
    ids = torch.as_tensor(bench.windows.calib)  # 32 windows of 64 tokens
    apply(bench.model, Recipe(), bench.cache)
    states = [block_inputs(list(_find_layers(bench.model)),
                           lambda i=i: bench.model(input_ids=ids[i:i + 1], use_cache=False))
              for i in range(len(ids))]
    assert len(states[0]) == 5  # four blocks' inputs and the stack's output
    built = bench.build(_student())
    _student_start(built)
    blocks = list(_find_layers(bench.model))
    assert len(blocks) == 3
    down = blocks[1].mlp.down_proj.weight
    with torch.no_grad():  # a pruned weight: half its entries zero
        down.mul_((torch.arange(down.numel()).reshape(down.shape) % 2 == 0).to(down.dtype))
    zeros = down == 0
    try:
        reports = distill_blocks(blocks, [0, 2, 3], states, steps=30, holdout=6,
                                 masks=[{}, {"mlp.down_proj.weight": ~zeros}, {}])
    finally:
        bench.model.requires_grad_(False)
        bench.cache.current.update(dict.fromkeys(built.formats, "?"))
    assert [r.steps for r in reports] == [30, 30, 30]
    assert all(r.mse <= r.mse_start for r in reports)
    assert all(r.mse < 0.95 * r.mse_start for r in reports), reports  # ~0.90 here
    assert bool((blocks[1].mlp.down_proj.weight[zeros] == 0).all())


def test_recovery_registry_distills_a_student_block_by_block_and_lowers_kl(bench4):
    """The registry's `local` (`--recover-method local`): the student's KL to the base on
    windows it never learned on (the evaluation windows) drops."""
    from llmpareto.search.recover import use_recovered
    from llmpareto.search.recover_methods import REGISTRY, choose_method

    bench = bench4
    student = _student()
    assert choose_method(bench, student, "local") == "local"
    ev = bench.windows.eval
    base = _base_log_probs(bench, ev)
    bench.build(student)
    before = _kl(bench, ev, base)
    calib = bench.windows.calib
    weights, exact = REGISTRY["local"].run(bench, student, calib[:26], 30, 0, False, calib[26:])
    assert exact is False
    assert {w.shape for w in weights.values()} and all(
        torch.isfinite(w).all() for w in weights.values())
    try:
        use_recovered(bench, student, weights, exact)
        after = _kl(bench, ev, base)
    finally:
        bench.cache.set_override({})
    assert after < 0.95 * before, (before, after)  # 1.55 -> 1.42 here
    assert np.isfinite(after)
