"""Recovery's methods (search/recover_methods.py): a registry chosen by what a candidate
changed, later rounds that continue from the weights an earlier one kept, and block-wise
reconstruction onto a lattice i-quant's own blocks."""

from __future__ import annotations

import numpy as np


def test_methods_come_from_a_registry_chosen_by_what_a_candidate_changed(tiny_model_dir):
    from llmpareto.recipe import Recipe
    from llmpareto.search.recover import REGISTRY, choose_method
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    bench = TrialRunner(SearchSettings(model=str(tiny_model_dir), window=64, eval_tokens=128,
                                       calib_tokens=128, progress=False, presets="none",
                                       formats="q4_0,q4_K,f16", context=256))
    assert set(REGISTRY) >= {"reconstruct", "distill", "qat"}
    assert choose_method(bench, Recipe.uniform("q4_0")) == "reconstruct"
    assert choose_method(bench, Recipe.uniform("f16")) is None  # nothing quantized
    student = Recipe.uniform("q4_0")
    student.structure = {"layers": [0], "mlp_ratio": None, "heads": None}
    assert choose_method(bench, student) == "distill"
    assert choose_method(bench, student, "local") == "local"
    assert choose_method(bench, Recipe.uniform("q4_0"), "qat") == "qat"
    assert choose_method(bench, Recipe.uniform("f16"), "qat") is None
    # the ladder of later rounds: quantization-aware training after reconstruction
    assert [choose_method(bench, Recipe.uniform("q4_0"), rung=r) for r in range(3)] == [
        "reconstruct", "qat", "qat"]
    assert choose_method(bench, student, rung=1) == "distill"
    assert choose_method(bench, Recipe.uniform("q4_0"), "reconstruct", rung=1) == "reconstruct"


def test_a_later_round_starts_from_the_weights_the_earlier_one_kept(tiny_model_dir):
    """Each method given `start` (an earlier round's weights) learns from there: with no steps
    reconstruction returns the same blocks, and one step of distillation stays next to them;
    without it, the post-training point (distillation: the base's floats)."""
    import torch

    from llmpareto.recipe import Recipe
    from llmpareto.search.recover import PACKED, REGISTRY, recovery_windows
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    bench = TrialRunner(SearchSettings(model=str(tiny_model_dir), window=64, eval_tokens=128,
                                       calib_tokens=512, progress=False, presets="none",
                                       formats="q4_0,q4_K,f16", context=256))
    recipe = Recipe.uniform("q4_0")
    learn, held = recovery_windows(bench)
    first, exact = REGISTRY["reconstruct"].run(bench, recipe, learn, 12, 0, False, held)
    assert exact and any(k.startswith(PACKED) for k in first)
    ptq = {f: bench.cache.dequantized(f, "q4_0").float() for f in bench.arch.formats_for(recipe)
           if not f.startswith(PACKED)}
    assert any(not torch.equal(first[f], ptq[f]) for f in ptq if f in first)
    again, _ = REGISTRY["reconstruct"].run(bench, recipe, learn, 0, 0, False, held,
                                           start=(first, True))
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)
    fresh, _ = REGISTRY["reconstruct"].run(bench, recipe, learn, 0, 0, False, held)
    assert all(torch.equal(fresh[f], ptq[f]) for f in fresh if not f.startswith(PACKED))
    learned = [f for f in first if not f.startswith(PACKED)]  # the blocks' linears
    base = {f: bench.cache.source(f).float() for f in learned}

    def gap(x: dict, y: dict) -> float:  # mean absolute difference over the tensors
        return float(torch.cat([(x[f] - y[f]).abs().flatten() for f in learned]).mean())

    for method in ("qat", "distill"):  # one step (lr 1e-4) moves each weight ~1e-4
        cont, _ = REGISTRY[method].run(bench, recipe, learn, 1, 0, False, held,
                                       start=(first, True))
        assert gap(cont, first) < 0.3 * gap(base, first), method
        assert bench.cache.override == {}  # the start does not outlive the call
        own, _ = REGISTRY[method].run(bench, recipe, learn, 1, 0, False, held)
        assert gap(own, base) < 0.3 * gap(base, first), method


def test_a_lattice_i_quant_is_reconstructed_into_its_own_blocks(tiny_model_dir):
    """iq2_xxs (the tiny model's down_proj, 256 wide; the narrower linears fall back to iq4_nl):
    reconstruction learns its codes onto the scales the run's quantizer chose and returns the
    blocks, which the cache then serves as the candidate's (what the GGUF export writes) and
    dequantizes as ggml does to the weights returned."""
    import torch

    from llmpareto.compress.lattice_codes import lattice_read
    from llmpareto.formats import get_format
    from llmpareto.recipe import Recipe
    from llmpareto.search.recover import (
        PACKED,
        REGISTRY,
        choose_method,
        recovery_windows,
        set_start,
    )
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    bench = TrialRunner(SearchSettings(model=str(tiny_model_dir), window=64, eval_tokens=128,
                                       calib_tokens=512, progress=False, presets="none",
                                       formats="iq2_xxs,f16", context=256))
    recipe = Recipe.uniform("iq2_xxs")
    formats = bench.arch.formats_for(recipe)
    down = [f for f, fmt in formats.items() if fmt == "iq2_xxs"]
    assert down and all(f.endswith("mlp.down_proj") for f in down)
    assert choose_method(bench, recipe) == "reconstruct"
    learn, held = recovery_windows(bench)
    got, exact = REGISTRY["reconstruct"].run(bench, recipe, learn, 12, 0, False, held)
    assert exact
    f = get_format("iq2_xxs")
    moved = 0
    for fqn in down:
        blocks = got[PACKED + fqn]
        ptq = torch.from_numpy(np.asarray(bench.cache.get(fqn, "iq2_xxs")).copy())
        rows = got[fqn].shape[0]
        assert torch.equal(lattice_read("iq2_xxs", blocks, rows)[0],
                           lattice_read("iq2_xxs", ptq, rows)[0])  # the quantizer's scales
        assert torch.equal(got[fqn], torch.from_numpy(
            f.dequantize(blocks.numpy(), tuple(got[fqn].shape)).copy()))
        moved += not torch.equal(blocks.reshape(ptq.shape), ptq)
    assert moved  # learning changed some codes
    set_start(bench, recipe, got, exact)
    try:
        for fqn in down:  # the candidate's blocks are now the learned ones, byte for byte
            assert np.array_equal(np.asarray(bench.cache.get(fqn, "iq2_xxs")).reshape(-1),
                                  got[PACKED + fqn].numpy().reshape(-1))
    finally:
        bench.cache.set_override({})


def test_a_tensor_its_format_holds_exactly_is_left_as_it_is(tiny_model_dir, tmp_path):
    """A model published quantized (the default model: Q4_1, which q5_1 holds exactly):
    reconstruction learns only the tensors their format changes; one it reproduces keeps the
    base weights, else it would trade its exactness for the calibration text."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from llmpareto.formats import get_format
    from llmpareto.recipe import Recipe
    from llmpareto.search.recover import REGISTRY, recovery_windows
    from llmpareto.search.recover_methods import _grid_tensors, holds_exactly
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fmt = get_format("q4_0")
    for layer in model.model.layers:  # q_proj published as q4_0: its own blocks, dequantized
        w = layer.self_attn.q_proj.weight
        w.data = torch.from_numpy(fmt.dequantize(fmt.quantize(w.detach().numpy()), w.shape))
    out = tmp_path / "published"
    model.save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    bench = TrialRunner(SearchSettings(model=str(out), window=64, eval_tokens=128,
                                       calib_tokens=512, progress=False, presets="none",
                                       formats="q4_0,q8_0,f16", context=256))
    recipe = Recipe.uniform("q4_0")
    q = [t.fqn for t in bench.arch.linears if t.fqn.endswith("q_proj")]
    learn_set = _grid_tensors(bench, recipe)
    assert q and not set(q) & set(learn_set)
    assert {t.fqn for t in bench.arch.linears if t.layer is not None} - set(q) <= set(learn_set)
    assert not holds_exactly(bench.cache, q[0], "q8_0")  # q8_0 has other steps: not exact
    learn, held = recovery_windows(bench)
    weights, _ = REGISTRY["reconstruct"].run(bench, recipe, learn, 4, 0, False, held)
    assert weights and not any(k.endswith(tuple(q)) for k in weights)
    # quantization-aware training (the ladder's next rung) does not move them either
    trained, _ = REGISTRY["qat"].run(bench, recipe, learn, 2, 0, False, held,
                                     start=(weights, True))
    assert all(torch.equal(trained[f], bench.cache.base[f].float()) for f in q)
    others = [f for f in trained if f not in q and f in learn_set]
    assert any(not torch.equal(trained[f], weights[f]) for f in others)


def test_holds_exactly_compares_in_the_models_own_precision():
    """A bfloat16 model published quantized holds its codes' values rounded to bfloat16: the
    format reproduces it exactly in the precision the model runs in (a float32 compare would
    call it different and learn it); a format that changes it is still not exact."""
    import numpy as np
    import torch

    from llmpareto.formats import get_format
    from llmpareto.search.recover_methods import holds_exactly

    fmt = get_format("q4_0")
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q = torch.from_numpy(np.asarray(fmt.dequantize(fmt.quantize(w.numpy()), w.shape),
                                    dtype=np.float32))

    class Cache:  # the three things holds_exactly reads of a VariantCache
        def __init__(self, base, variant):
            self.override, self.base, self.variant = {}, {"w": base}, variant

        def dequantized(self, fqn, fmt):
            return self.variant

    assert not torch.equal(q.to(torch.bfloat16).float(), q)  # the float32 values differ
    assert holds_exactly(Cache(q.to(torch.bfloat16), q), "w", "q4_0")
    assert holds_exactly(Cache(q.clone(), q), "w", "q4_0")
    assert not holds_exactly(Cache(w.to(torch.bfloat16), q), "w", "q4_0")
