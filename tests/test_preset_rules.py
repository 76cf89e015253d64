"""preset_rules (llama.cpp's per-tensor type choice, from the shape alone) against the types
llama.cpp's own quantizer writes, on random models whose shapes exercise every rule: layer
counts where `use_more_bits` and the n/8, n/16 cut-offs differ, GQA below and at 4, tied and
untied heads, rows that K-quants fit and rows they fall back on, and the 70B attn_v rule."""

import pytest

from llmpareto.arch import Arch
from llmpareto.compress import VariantCache
from llmpareto.errors import UserError
from llmpareto.models import load_model, resolve_model
from llmpareto.preset_rules import RULE_PRESETS, preset_formats, preset_recipe, use_more_bits
from llmpareto.shapes import known_shape
from llmpareto.spaces import presets as P
from llmpareto.tiny import build_tiny_model

SHAPES = {  # name -> build_tiny_model config
    "gqa4-tied-16": {"num_hidden_layers": 16, "hidden_size": 256, "intermediate_size": 512,
                         "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512},
    "mha-untied-fallback-18": {"tie": False, "num_hidden_layers": 18, "hidden_size": 320,
                                   "intermediate_size": 512, "num_attention_heads": 4,
                                   "num_key_value_heads": 4, "vocab_size": 512},
    "70b-rule-80": {"num_hidden_layers": 80, "hidden_size": 256, "intermediate_size": 256,
                        "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 512},
}


@pytest.fixture(scope="module", params=list(SHAPES))
def written(request, tmp_path_factory):
    """(arch, preset -> fqn -> format llama.cpp wrote)."""
    cfg = dict(SHAPES[request.param])
    folder = build_tiny_model(tmp_path_factory.mktemp(request.param) / "m", **cfg)
    source = resolve_model(str(folder))
    model, tokenizer = load_model(source)
    arch = Arch.from_model(model)
    got = P.llama_cpp_presets(model, VariantCache(model, arch), source, tokenizer,
                              presets=RULE_PRESETS)
    return arch, got


def test_rules_equal_llama_cpp_quantizer(written):
    arch, got = written
    for preset in RULE_PRESETS:
        ours = preset_formats(arch, preset)
        theirs = {fqn: fmt or "f32" for fqn, fmt in got[preset].items()}
        diff = {f: (ours[f], theirs[f]) for f in theirs if ours.get(f) != theirs[f]}
        assert not diff, f"{preset}: {len(diff)} tensors differ, e.g. {list(diff.items())[:4]}"


def test_mixes_are_mixed_where_llama_cpp_mixes(written):
    """Guards the test above against shapes where every preset is uniform."""
    _arch, got = written
    kinds = {fmt for fmt in got["Q4_K_M"].values()}
    assert len(kinds) >= 2, kinds


def test_use_more_bits_pattern():
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


def test_known_shape_q4_k_m_size():
    """Llama-2-7B Q4_K_M: 3.80 GiB for the weights as llama.cpp's model card tables list
    (4.08 GB file, https://huggingface.co/TheBloke/Llama-2-7B-GGUF); within 1%."""
    from llmpareto.formats import get_format

    arch = known_shape("llama-2-7b").arch()
    fmts = preset_formats(arch, "Q4_K_M")
    nbytes = sum(t.numel * get_format(fmts[t.fqn]).bits_per_weight / 8 for t in arch.tensors)
    assert abs(nbytes / 4.08e9 - 1) < 0.01, nbytes
    assert preset_recipe(arch, "Q4_K_M").format_of("lm_head") == "q6_K"


def test_unknown_preset():
    with pytest.raises(UserError, match="Q4_K_M"):
        preset_formats(known_shape("llama-2-7b").arch(), "Q4_K_XL")
