"""Per-block students (AMC-style structure that llama.cpp runs smaller): each kept block its own
MLP width and KV-group count; costed, exported (GGUF as llama.cpp's deci architecture, HF
padded to the widest block) and searched with formats."""

import json

import numpy as np
import pytest
import torch

from llmpareto.arch import Arch
from llmpareto.budget import Workload
from llmpareto.compress import VariantCache, apply
from llmpareto.compress.calibration import collect_input_stats
from llmpareto.compress.restructure import slice_weight
from llmpareto.errors import UserError
from llmpareto.evaluators import Candidate, MemoryEvaluator
from llmpareto.models import load_model, resolve_model
from llmpareto.recipe import Recipe
from llmpareto.tiny import build_tiny_model

HIDDEN, INTER, HEADS, KV, HD = 64, 256, 4, 2, 16
# keeps blocks 0 and 2 of 3: block 0 at half the MLP and one KV group, block 2 at 3/4 and both
STRUCTURE = {"layers": [0, 2], "mlp_ratio": [0.5, 0.75], "heads": [1, 2]}


@pytest.fixture(scope="module")
def three_block_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("pb") / "model", num_hidden_layers=3,
                            initializer_range=0.2)


@pytest.fixture
def setup(three_block_dir):
    source = resolve_model(str(three_block_dir))
    model, tok = load_model(source)
    model.llmpareto_test = (source, tok)
    arch = Arch.from_model(model)
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 32))
    fqns = [t.fqn for t in arch.linears if t.kind in ("mlp.down_proj", "self_attn.o_proj")]
    stats = collect_input_stats(model, windows, fqns, diag_only=True)
    cache = VariantCache(model, arch)
    cache.set_importance({f: s.col_norm for f, s in stats.items()})
    return model, arch, cache, windows


def _block_params(width: int, kv: int) -> int:
    """Weights of one Llama block of MLP width `width` and `kv` KV groups (2 query heads each),
    its two RMSNorms included."""
    q = kv * 2 * HD
    return HIDDEN * q * 2 + 2 * HIDDEN * kv * HD + 3 * HIDDEN * width + 2 * HIDDEN


def test_per_block_student_has_each_blocks_own_parameter_count(setup):
    model, arch, cache, _ = setup
    apply(model, Recipe(structure=STRUCTURE), cache)
    blocks = list(model.model.layers)
    assert len(blocks) == 2
    for block, (width, kv) in zip(blocks, [(128, 1), (192, 2)]):
        assert sum(p.numel() for p in block.parameters()) == _block_params(width, kv)
        assert tuple(block.mlp.down_proj.weight.shape) == (HIDDEN, width)
        assert tuple(block.self_attn.k_proj.weight.shape) == (kv * HD, HIDDEN)
    small = arch.restructure(STRUCTURE)  # the cost model's view: the same shapes
    assert small.kv_heads_of_blocks == [1, 2] and small.n_kv_heads == 2
    for t in small.linears:
        new = STRUCTURE["layers"].index(t.layer)
        w = model.get_submodule(t.fqn.replace(f".layers.{t.layer}.", f".layers.{new}.")).weight
        assert tuple(w.shape) == (t.rows, t.cols), t.fqn
    assert model._llmpareto_blocks == {"intermediate_size": [128, 192],
                                       "num_key_value_heads": [1, 2],
                                       "num_attention_heads": [2, 4]}
    # the config holds the widest block; back to the teacher, everything is as it was
    assert (model.config.intermediate_size, model.config.num_key_value_heads) == (192, 2)
    apply(model, Recipe(), cache)
    assert model._llmpareto_blocks is None and model.config.intermediate_size == INTER


def test_per_block_logits_equal_a_model_built_block_by_block(setup):
    """Reference: every block a fresh LlamaDecoderLayer built from its own config (its width and
    heads), the student's sliced weights loaded into it."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, _, cache, windows = setup
    apply(model, Recipe(structure=STRUCTURE), cache)
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        got = model(ids).logits
    slices = cache.slices(STRUCTURE)
    base_cfg = type(model.config).from_dict({**model.config.to_dict(),
                                             "num_hidden_layers": 2})
    ref_layers = []
    for new, (old, width, kv) in enumerate(zip([0, 2], [128, 192], [1, 2])):
        cfg = type(base_cfg).from_dict({**base_cfg.to_dict(), "intermediate_size": width,
                                        "num_key_value_heads": kv, "num_attention_heads": 2 * kv,
                                        "head_dim": HD})
        cfg._attn_implementation = model.config._attn_implementation  # the model's masks
        layer = LlamaDecoderLayer(cfg, new)
        state = {}
        for name, _ in layer.named_parameters():
            fqn = f"model.layers.{old}.{name.removesuffix('.weight')}"
            if fqn in cache.base:
                sl = slices.get(fqn)
                state[name] = cache.base[fqn] if sl is None else \
                    slice_weight(cache.base[fqn], sl[1], sl[2])
            else:  # norms: the teacher's block's own
                state[name] = cache.all_layers[old].get_parameter(name).detach()
        layer.load_state_dict(state)
        ref_layers.append(layer.eval())
    saved = model.model.layers
    model.model.layers = torch.nn.ModuleList(ref_layers)
    try:
        with torch.no_grad():
            want = model(ids).logits
    finally:
        model.model.layers = saved
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    apply(model, Recipe(), cache)


def test_per_block_lists_round_trip_and_old_recipes_load(tmp_path):
    import jsonschema

    r = Recipe({"_default": {"format": "q4_0"}}, structure=dict(STRUCTURE))
    assert r.to_dict()["version"] == 2
    path = tmp_path / "r.json"
    r.save(path)
    back = Recipe.load(path)
    assert back.structure == STRUCTURE and back.to_dict() == r.to_dict()
    jsonschema.validate(json.loads(path.read_text()), Recipe.schema())
    old = {"version": 1, "modules": {"_default": {"format": "q8_0"}},
           "structure": {"layers": [0, 1], "mlp_ratio": 0.5, "heads": 1}}
    loaded = Recipe.from_dict(old)
    assert loaded.structure == old["structure"] and loaded.to_dict() == old  # written as read
    jsonschema.validate(old, Recipe.schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**old, "structure": {"mlp_ratio": [0.5]}}, Recipe.schema())
    with pytest.raises(UserError, match='"version": 2'):
        Recipe.from_dict({**old, "structure": {"mlp_ratio": [0.5, 1.0]}})


def test_cost_follows_each_blocks_width_and_kv_groups(setup):
    _, arch, _, _ = setup
    w = Workload(context=256)

    def mem(structure):
        r = Recipe({"_default": {"format": "q8_0"}}, structure=structure)
        return MemoryEvaluator(arch, w).evaluate(Candidate(r, arch.formats_for(r)))

    two = mem({"layers": [0, 2]})
    per = mem(STRUCTURE)
    # KV: block 0 holds one group of two, block 2 both: 3/4 of the two full blocks
    assert per["kv_cache_bytes"] == two["kv_cache_bytes"] * 3 / 4
    q8 = 8.5 / 8  # bytes per weight
    saved = (3 * HIDDEN * (256 - 128) + 3 * HIDDEN * (256 - 192)  # MLP channels
             + 2 * HIDDEN * 2 * HD + 2 * HIDDEN * HD)  # block 0's second group: q, o, k, v
    assert two["weights_bytes"] - per["weights_bytes"] == pytest.approx(saved * q8, abs=1e-6)
    from llmpareto.evaluators.cost import LatencyEnergyEvaluator
    from llmpareto.evaluators.host import load_device

    p = load_device("raspberry-pi-5")
    ev = LatencyEnergyEvaluator(arch, p, w)
    lat = {}
    for k, s in (("two", {"layers": [0, 2]}), ("per", STRUCTURE)):
        r = Recipe({"_default": {"format": "q8_0"}}, structure=s)
        lat[k] = ev.evaluate(Candidate(r, arch.formats_for(r)))
    assert lat["per"]["latency_ms"] < lat["two"]["latency_ms"]
    # the per-block overhead stays per block: both have two blocks
    fixed = p.overhead_s_per_layer * 2
    assert fixed > 0 and lat["per"]["latency_ms"] > 1e3 * fixed


def test_gguf_holds_the_arrays_and_llama_cpp_runs_it(setup, tmp_path):
    import gguf

    from llmpareto.evaluators.llamacpp import gguf_perplexity
    from llmpareto.evaluators.quality import window_nll
    from llmpareto.gguf_write import write_gguf

    model, _, cache, windows = setup
    recipe = Recipe({"_default": {"format": "q8_0"}}, structure=STRUCTURE)
    formats = apply(model, recipe, cache)
    source, tok = model.llmpareto_test
    path = write_gguf(tmp_path / "s.gguf", model, cache, formats, source, tok)
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "deci"
    assert fields["deci.block_count"].contents() == 2
    assert fields["deci.feed_forward_length"].contents() == [128, 192]
    assert fields["deci.attention.head_count_kv"].contents() == [1, 2]
    assert fields["deci.attention.head_count"].contents() == [2, 4]
    nll, n = window_nll(model, windows, 4)
    ppl = float(np.exp(nll / n))
    assert abs(gguf_perplexity(str(path), windows) - ppl) / ppl < 0.01
    apply(model, Recipe(), cache)


def test_padded_hf_export_reproduces_the_logits(setup, tmp_path):
    from llmpareto.export.hf import write_hf
    from llmpareto.search.workbench import Built

    model, _, cache, windows = setup
    recipe = Recipe({"_default": {"format": "q8_0"}}, structure=STRUCTURE)
    formats = apply(model, recipe, cache)
    source, tok = model.llmpareto_test
    built = Built(model, tok, cache, formats, source, 1)
    kind = write_hf(tmp_path / "hf", built)
    assert "padded" in kind
    again, _ = load_model(resolve_model(str(tmp_path / "hf")))
    assert (again.config.intermediate_size, again.config.num_key_value_heads) == (192, 2)
    assert tuple(again.model.layers[0].mlp.down_proj.weight.shape) == (HIDDEN, 192)
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    apply(model, Recipe(), cache)


def test_block_granularity_space_gives_per_block_keys_and_lists(setup):
    from llmpareto.spaces import build_space

    _, arch, _, _ = setup
    space = build_space("formats,students", arch, formats=["q8_0", "q4_0"],
                        mlp_ratios=[1, 0.5], heads=[2, 1], student_granularity="block")
    space.students.set_block_influence([0.5, 0.1, 0.4])
    keys = [k for k in space.choices if k.startswith("student:")]
    assert keys == ["student:blocks", *(f"student:mlp_ratio.{i}" for i in range(3)),
                    *(f"student:heads.{i}" for i in range(3))]
    params = {k: c[0] for k, c in space.choices.items()}
    params.update({"student:blocks": 2, "student:mlp_ratio.0": 0.5, "student:heads.2": 1})
    recipe = space.recipe_from_params(params)
    assert recipe.structure == {"layers": [0, 2], "mlp_ratio": [0.5, 1.0], "heads": [2, 1]}
    arch.restructure(recipe.structure)  # a valid student
    # every block alike: written as one value (a homogeneous student, exported as today)
    same = {**params, "student:mlp_ratio.0": 0.5, "student:mlp_ratio.2": 0.5,
            "student:heads.2": 2}
    assert space.recipe_from_params(same).structure == {"layers": [0, 2], "mlp_ratio": 0.5}
    labels = [label for label, _ in space.baselines()]
    assert "student mlp_ratio=0.5 + q8_0" in labels and "student heads=1 + q8_0" in labels


@pytest.mark.parametrize("structure, match", [
    ({"mlp_ratio": [0.5, 0.5, 0.5]}, "has 3 values but the student keeps 2 blocks"),
    ({"heads": [1]}, "has 1 values but the student keeps 2 blocks"),
    ({"mlp_ratio": [0.3, 1.0]}, r"not a multiple of 32.*0\.25 \(64\) or 0\.375 \(96\)"),
    ({"mlp_ratio": [1.25, 1.0]}, "never wider"),
    ({"heads": [0, 2]}, "whole attention groups"),
    ({"heads": [1.5, 2]}, "whole attention groups"),
    ({"heads": [3, 2]}, "whole attention groups"),
])
def test_bad_per_block_structures_are_named(setup, structure, match):
    _, arch, _, _ = setup
    with pytest.raises(UserError, match=match):
        arch.restructure({"layers": [0, 2], **structure})


def test_bad_per_block_recipe_in_a_search_is_one_line(tiny_settings, tmp_path, capsys):
    """A per-block recipe of the wrong length given where users give recipes (`llmpareto
    cost --recipe`)."""
    from llmpareto.cli import main

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"version": 2, "modules": {"_default": {"format": "q8_0"}},
                                "structure": {"mlp_ratio": [0.5, 0.5, 0.5]}}))
    rc = main(["cost", "--model", tiny_settings["model"], "--recipe", str(path)])
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("llmpareto: error:") and "keeps 2 blocks" in last, last


@pytest.mark.parametrize("strategy", ["knapsack", "evolve"])
def test_block_granularity_search_profiles_and_allocates_per_block(tiny_settings, tmp_path,
                                                                   strategy):
    """The knapsack and evolve strategies over formats and per-block structure: the
    sensitivity profile holds a KL per block key, and the run's trials include per-block
    students."""
    import llmpareto

    s = {**tiny_settings, "formats": "q8_0,q4_0", "trials": 12}
    front = llmpareto.search(**s, space="formats,students", student_granularity="block",
                             student_mlp_ratios="1,0.5", student_heads="2,1",
                             student_blocks="2", strategy=strategy,
                             objectives="kl_nats,memory_bytes")
    run = tmp_path / "runs" / "t"
    profile = json.loads((run / "sensitivity.json").read_text())
    delta = profile["delta_kl_nats"]
    for i in range(2):
        assert len(delta[f"student:mlp_ratio.{i}"]) == 2
        assert delta[f"student:mlp_ratio.{i}"][1] > 0  # cutting a block's MLP costs KL
    recipes = [Recipe.load(p) for p in (run / "recipes").glob("*.json")]
    per_block = [r for r in recipes if any(isinstance(v, list) for v in r.structure.values())]
    assert per_block, [r.structure for r in recipes]
    assert front.trials["state"].eq("COMPLETE").sum() == 12


def test_sparsity_is_said_to_run_no_faster_in_llama_cpp_and_that_is_true(capsys):
    """The --help line says no shipped llama.cpp profile runs weight sparsity faster or
    smaller: every shipped llama.cpp profile has no sparse kernel (so the claim must change
    when one gets one)."""
    from llmpareto.cli import main
    from llmpareto.device_profiles.loader import list_profiles, load_profile

    llama = [n for n in list_profiles() if "llama.cpp" in load_profile(n).runtime]
    assert len(llama) >= 5
    for name in llama:  # a profile's sparse kernels are another runtime's (PyTorch 2:4)
        p = load_profile(name)
        assert all("llama.cpp" not in k.runtime for k in p.sparse_kernels.values()), name
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "llama.cpp runs it no faster or smaller" in text
    assert "--student-granularity block" in text


def test_per_block_student_of_a_gguf_source_exports_as_deci(setup, tmp_path):
    """From a GGUF source (the default model's path): the source's keys move to the deci
    prefix, its tokenizer stays, and llama.cpp runs the per-block file."""
    import gguf

    from llmpareto.evaluators.llamacpp import gguf_perplexity
    from llmpareto.evaluators.quality import window_nll
    from llmpareto.gguf_write import write_gguf

    model, _, cache, windows = setup
    formats = apply(model, Recipe({"_default": {"format": "f16"}}), cache)
    source, tok = model.llmpareto_test
    src = write_gguf(tmp_path / "src.gguf", model, cache, formats, source, tok)
    gsource = resolve_model(str(src))
    gmodel, gtok = load_model(gsource)
    arch = Arch.from_model(gmodel)
    fqns = [t.fqn for t in arch.linears if t.kind in ("mlp.down_proj", "self_attn.o_proj")]
    stats = collect_input_stats(gmodel, windows, fqns, diag_only=True)
    gcache = VariantCache(gmodel, arch)
    gcache.set_importance({f: s.col_norm for f, s in stats.items()})
    formats = apply(gmodel, Recipe({"_default": {"format": "q8_0"}}, structure=STRUCTURE), gcache)
    out = write_gguf(tmp_path / "out.gguf", gmodel, gcache, formats, gsource, gtok)
    r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert r_out.fields["general.architecture"].contents() == "deci"
    assert r_out.fields["deci.feed_forward_length"].contents() == [128, 192]
    assert not [k for k in r_out.fields if k.startswith("llama.")]
    eps = "attention.layer_norm_rms_epsilon"
    assert r_out.fields[f"deci.{eps}"].contents() == r_src.fields[f"llama.{eps}"].contents()
    assert r_out.fields["tokenizer.ggml.tokens"].contents() == \
        r_src.fields["tokenizer.ggml.tokens"].contents()
    nll, n = window_nll(gmodel, windows, 4)
    ppl = float(np.exp(nll / n))
    assert abs(gguf_perplexity(str(out), windows) - ppl) / ppl < 0.01
