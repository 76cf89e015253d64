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
