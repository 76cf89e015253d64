"""compress.apply and the prepared-variant cache on the tiny model."""

import numpy as np
import pytest
import torch

from llmpareto.arch import Arch
from llmpareto.compress import VariantCache, apply
from llmpareto.formats import get_format
from llmpareto.models import load_model, resolve_model
from llmpareto.recipe import Recipe


@pytest.fixture
def tiny(tiny_model_dir):
    model, _ = load_model(resolve_model(str(tiny_model_dir)))
    return model, Arch.from_model(model)


def test_apply_sets_exact_dequantized_weights_and_restores_base(tiny):
    model, arch = tiny
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cache = VariantCache(model, arch)
    recipe = Recipe({"re:.*mlp.*": {"format": "q4_0"}, "model.embed_tokens": {"format": "q8_0"}})
    formats = apply(model, recipe, cache)
    down = model.get_submodule("model.layers.1.mlp.down_proj").weight
    fmt = get_format("q4_0")
    expected = fmt.dequantize(fmt.quantize(base["model.layers.1.mlp.down_proj.weight"].numpy()),
                              tuple(down.shape))
    assert np.array_equal(down.detach().numpy(), expected)
    assert formats["model.layers.0.self_attn.q_proj"] is None
    assert torch.equal(model.get_submodule("model.layers.0.self_attn.q_proj").weight,
                       base["model.layers.0.self_attn.q_proj.weight"])
    # tied output head follows the embedding's format
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, base["model.embed_tokens.weight"])
    apply(model, Recipe(), cache)  # empty recipe: everything back to base, bit for bit
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_dense_level_is_bounded_and_reused(tiny):
    model, arch = tiny
    one = 4 * arch.linears[0].numel
    cache = VariantCache(model, arch, dense_bytes=3 * one)
    for fmt in ("q8_0", "q4_0", "q5_0"):
        apply(model, Recipe.uniform(fmt), cache)
        assert cache._dense_used <= 3 * one
    hits = cache.hits
    apply(model, Recipe.uniform("q8_0"), cache)
    apply(model, Recipe.uniform("q8_0"), cache)  # unchanged: no lookups at all
    assert cache.hits == hits  # evicted long ago: all misses, no hits
    big = VariantCache(model, arch)
    big.prepare([(t.fqn, "q4_0") for t in arch.tensors])
    assert big.misses == len(arch.tensors) and len(big.dense) == len(arch.tensors)
    apply(model, Recipe.uniform("q4_0"), big)
    assert big.hits == len(arch.tensors)  # warmed during prepare: pointer swaps only


def test_apply_prunes_from_the_base_then_quantizes_and_comes_back(tiny):
    from llmpareto.compress.calibration import collect_input_stats

    model, arch = tiny
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cache = VariantCache(model, arch)
    recipe = Recipe({"re:.*mlp.*": {"sparsity": 0.5},  # no format: stored as f16
                     "model.layers.0.self_attn.q_proj": {"format": "q4_0", "sparsity": 0.3}})
    assert arch.formats_for(recipe)["model.layers.1.mlp.up_proj"] == "f16"
    assert set(arch.sparsity_for(recipe)) == {t.fqn for t in arch.linears if "mlp" in t.fqn} | {
        "model.layers.0.self_attn.q_proj"}
    apply(model, recipe, cache)
    up = model.get_submodule("model.layers.1.mlp.up_proj").weight
    assert int((up == 0).sum()) == round(0.5 * up.numel())  # f16 keeps each non-zero
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    pruned = cache.pruned("model.layers.0.self_attn.q_proj", ("unstructured", 0.3)) == 0
    assert bool((q[pruned] == 0).all())  # q4_0 keeps the zeros (and may add some)
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16))
    apply(model, Recipe(), cache)  # statistics of the base model
    fqns = [t.fqn for t in arch.linears]
    cache.set_pruning("wanda", collect_input_stats(model, windows, fqns, diag_only=True))
    apply(model, Recipe({"re:.*": {"format": "q8_0", "pattern": "2:4"}}), cache)
    down = model.get_submodule("model.layers.1.mlp.down_proj").weight
    assert bool(((down != 0).reshape(down.shape[0], -1, 4).sum(2) <= 2).all())
    emb = model.model.embed_tokens.weight  # embeddings are never pruned: the dense q8_0 variant
    assert torch.equal(emb, cache.dequantized("model.embed_tokens", "q8_0"))
    apply(model, Recipe(), cache)
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_prepared_level_is_bounded_in_a_joint_space_and_remade_identically(tiny):
    """formats x levels multiply variants; the prepared level stays under its bound, and a
    variant dropped from it comes back equal to the first one made."""
    model, arch = tiny
    sizes = [4 * t.numel for t in arch.linears]
    bound = 3 * max(sizes)
    cache = VariantCache(model, arch, dense_bytes=0, packed_bytes=bound)
    first = {}
    for level in (0.25, 0.5, 0.75):
        for fmt in ("q8_0", "q4_0", "f16"):
            recipe = Recipe({"_default": {"format": fmt},
                             "re:.*layers.*": {"format": fmt, "sparsity": level}})
            apply(model, recipe, cache)
            assert 0 < cache.nbytes <= bound
            fqn = arch.linears[0].fqn
            first[(level, fmt)] = model.get_submodule(fqn).weight.detach().clone()
    assert cache.remade > 0  # the bound forced re-makes
    made = cache.remade
    for (level, fmt), w in first.items():
        recipe = Recipe({"_default": {"format": fmt},
                         "re:.*layers.*": {"format": fmt, "sparsity": level}})
        apply(model, recipe, cache)
        assert torch.equal(model.get_submodule(arch.linears[0].fqn).weight, w)
    assert cache.remade > made and cache.nbytes <= bound
    # prepare_pruned stops at the bound instead of evicting what it just made
    fresh = VariantCache(model, arch, dense_bytes=0, packed_bytes=bound)
    items = [(t.fqn, ("unstructured", 0.5)) for t in arch.linears]
    assert fresh.prepare_pruned(items) < len(items) and fresh.remade == 0


def test_recipe_patterns_are_n_of_m_or_unstructured():
    from llmpareto.errors import UserError

    r = Recipe({"a": {"pattern": "4:8"}, "b": {"pattern": "unstructured", "sparsity": 0.2}})
    assert r.sparsity_of("a") == ("4:8", 0.5) and r.sparsity_of("b") == ("unstructured", 0.2)
    assert Recipe({"a": {"format": "q8_0"}}).sparsity_of("a") is None
    for bad in ("3:2", "2:2", "half"):
        with pytest.raises(UserError, match="N < M"):
            Recipe({"a": {"pattern": bad}})
