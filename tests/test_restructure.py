"""Students: real smaller models (depth, MLP width, whole attention groups) cut from the base
model by importance, costed with their real shapes, quantized and pruned like any model."""

import numpy as np
import pytest
import torch

from llmpareto.arch import Arch
from llmpareto.budget import Workload
from llmpareto.compress import VariantCache, apply
from llmpareto.compress.calibration import collect_input_stats
from llmpareto.compress.restructure import (
    block_influence,
    head_rows,
    keep_blocks,
    mlp_width,
    slice_weight,
)
from llmpareto.errors import UserError
from llmpareto.evaluators import Candidate, MemoryEvaluator
from llmpareto.models import load_model, resolve_model
from llmpareto.recipe import Recipe


@pytest.fixture
def student_setup(tiny_model_dir):
    model, _ = load_model(resolve_model(str(tiny_model_dir)))
    arch = Arch.from_model(model)
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 32))
    fqns = [t.fqn for t in arch.linears if t.kind in ("mlp.down_proj", "self_attn.o_proj")]
    stats = collect_input_stats(model, windows, fqns, diag_only=True)
    cache = VariantCache(model, arch)
    cache.set_importance({f: s.col_norm for f, s in stats.items()})
    return model, arch, cache, windows


def _smaller_reference(model, cache, structure):
    """A LlamaForCausalLM built from the student's config, weights copied in by hand."""
    from transformers import AutoModelForCausalLM

    cfg = type(model.config).from_dict(model.config.to_dict())
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    slices = cache.slices(structure)
    layers = structure.get("layers", list(range(cache.n_layers)))
    state = {}
    for name, p in dict(model.named_parameters()).items():
        state[name] = p.detach()
    for new, old in enumerate(layers):
        for fqn in cache.shapes:
            if f".layers.{old}." in f".{fqn}.":
                sl = slices.get(fqn)
                w = cache.base[fqn] if sl is None else slice_weight(cache.base[fqn], sl[1], sl[2])
                state[fqn.replace(f".layers.{old}.", f".layers.{new}.") + ".weight"] = w
    ref.load_state_dict({k: v for k, v in state.items() if k in ref.state_dict()}, strict=False)
    return ref


def test_student_is_a_real_smaller_model_with_its_config_and_parameter_count(student_setup):
    model, arch, cache, windows = student_setup
    n_base = sum(p.numel() for p in model.parameters())
    structure = {"layers": [1], "mlp_ratio": 0.5, "heads": 1}
    apply(model, Recipe(structure=structure), cache)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size) == (1, mlp_width(256, 0.5)) == (1, 128)
    assert (cfg.num_key_value_heads, cfg.num_attention_heads) == (1, 2)  # a whole group
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(type(cfg).from_dict(cfg.to_dict()))
    n_student = sum(p.numel() for p in model.parameters())
    assert n_student == sum(p.numel() for p in fresh.parameters()) < n_base
    # the cost model sees exactly these shapes
    small = arch.restructure(structure)
    for t in small.linears:
        w = model.get_submodule(t.fqn.replace(".layers.1.", ".layers.0.")).weight
        assert tuple(w.shape) == (t.rows, t.cols), t.fqn
    ids = torch.from_numpy(windows)
    ref = _smaller_reference(model, cache, structure)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    # and back to the teacher, bit for bit
    apply(model, Recipe(), cache)
    assert sum(p.numel() for p in model.parameters()) == n_base
    assert model.config.intermediate_size == 256 and model.config.num_key_value_heads == 2
    for fqn, w in cache.base.items():
        assert model.get_submodule(fqn).weight is cache.weight(fqn)
        assert torch.equal(cache.weight(fqn), w)


def test_heads_keep_grouped_query_groups_whole(student_setup):
    _model, arch, cache, _ = student_setup
    slices = cache.slices({"heads": 1})
    per_q, hd = 2 * arch.head_dim, arch.head_dim  # 4 query heads over 2 KV heads
    for layer in range(2):
        q = slices[f"model.layers.{layer}.self_attn.q_proj"][1]
        k = slices[f"model.layers.{layer}.self_attn.k_proj"][1]
        o_cols = slices[f"model.layers.{layer}.self_attn.o_proj"][2]
        group = int(k[0]) // hd
        assert torch.equal(k, head_rows(torch.tensor([group]), hd))
        assert torch.equal(q, head_rows(torch.tensor([group]), per_q)) and torch.equal(q, o_cols)
    # importance picks the group whose o_proj inputs carry more
    norms = cache.importance["model.layers.0.self_attn.o_proj"].double() ** 2
    best = int(torch.argmax(norms.reshape(2, -1).sum(1)))
    assert int(slices["model.layers.0.self_attn.k_proj"][1][0]) // hd == best


def test_student_cost_sees_fewer_blocks_narrower_mlp_and_smaller_kv(student_setup):
    _, arch, _, _ = student_setup
    w = Workload(context=256)

    def mem(structure):
        r = Recipe({"_default": {"format": "q8_0"}}, structure=structure)
        return MemoryEvaluator(arch, w).evaluate(Candidate(r, arch.formats_for(r)))

    full, half_mlp, one_group = mem({}), mem({"mlp_ratio": 0.5}), mem({"heads": 1})
    assert one_group["kv_cache_bytes"] == full["kv_cache_bytes"] / 2
    assert half_mlp["kv_cache_bytes"] == full["kv_cache_bytes"]
    mlp_bytes = sum(t.numel for t in arch.linears if t.kind.startswith("mlp.")) * 8.5 / 8
    assert full["weights_bytes"] - half_mlp["weights_bytes"] == mlp_bytes / 2


def test_students_quantize_and_prune_their_own_shapes(student_setup):
    from llmpareto.formats import get_format

    model, _arch, cache, _ = student_setup
    recipe = Recipe({"_default": {"format": "q4_0"},
                     "re:.*mlp.*": {"format": "q8_0", "sparsity": 0.5}},
                    structure={"mlp_ratio": 0.5})
    apply(model, recipe, cache)
    down = model.get_submodule("model.layers.0.mlp.down_proj").weight
    assert tuple(down.shape) == (64, 128)
    assert int((down == 0).sum()) >= round(0.5 * down.numel())  # exact ratio, then q8_0 zeros
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach().numpy()
    f = get_format("q4_0")
    assert np.array_equal(f.dequantize(f.quantize(q), q.shape), q)  # on the q4_0 grid


def test_block_influence_ranks_blocks_and_keeps_the_strongest(student_setup):
    model, _, _, windows = student_setup
    bi = block_influence(model, windows)
    assert len(bi) == 2 and all(0 <= v <= 2 for v in bi)
    assert keep_blocks(bi, 1) == [int(np.argmax(bi))]
    assert keep_blocks([0.1, 0.5, 0.2, 0.4], 2) == [1, 3]


@pytest.mark.parametrize("structure, match", [
    ({"mlp_ratio": 1.5}, "never wider"),
    ({"heads": 3}, "whole attention groups"),
    ({"heads": 0}, "whole attention groups"),
    ({"layers": []}, "non-empty"),
])
def test_bad_structures_are_named(student_setup, structure, match):
    _, arch, _, _ = student_setup
    with pytest.raises(UserError, match=match):
        arch.restructure(structure)


@pytest.fixture(scope="module")
def three_way(tiny_model_dir, tmp_path_factory):
    import llmpareto

    runs = tmp_path_factory.mktemp("runs")
    front = llmpareto.search(model=str(tiny_model_dir), runs_dir=str(runs), study="s3", window=64,
                             eval_tokens=128, calib_tokens=128, trials=14, progress=False,
                             context=256, space="formats,sparsity,students",
                             formats="q8_0,q4_0", sparsity_levels="0,0.5", granularity="block",
                             student_blocks="2,1", student_mlp_ratios="1,0.5",
                             student_heads="2,1")
    return runs / "s3", front


def test_three_way_joint_search_runs_end_to_end(three_way):
    run, front = three_way
    t = front.trials.set_index("trial")
    labels = t["baseline"].fillna("").tolist()
    assert labels[:2] == ["uniform q8_0", "uniform q4_0"]
    assert "student blocks=1 + q8_0" in labels and "student heads=1 + q8_0" in labels
    done = t[t["state"] == "COMPLETE"]
    assert len(done) == 14 and done["perplexity"].notna().all()
    one_block = labels.index("student blocks=1 + q8_0")
    assert Recipe.load(run / "recipes" / f"{one_block}.json").structure["layers"] in ([0], [1])
    assert t.loc[one_block, "memory_bytes"] < t.loc[0, "memory_bytes"]  # fewer blocks, less KV
    heads = labels.index("student heads=1 + q8_0")
    assert t.loc[heads, "kv_cache_bytes"] == t.loc[0, "kv_cache_bytes"] / 2


def test_a_student_exports_to_gguf_and_hf_and_runs_in_llama_cpp(three_way, tmp_path):
    import gguf

    from llmpareto.evaluators.llamacpp import gguf_perplexity
    from llmpareto.evaluators.quality import window_nll
    from llmpareto.export.hf import write_hf
    from llmpareto.gguf_write import write_gguf
    from llmpareto.search.workbench import Workbench

    run, _ = three_way
    rb = Workbench.from_run(run)
    recipe = Recipe({"_default": {"format": "q8_0"}},
                    structure={"layers": [1], "mlp_ratio": 0.5, "heads": 1})
    built = rb.build(recipe)
    windows = rb.windows.eval
    nll, n = window_nll(built.model, windows, 4)
    path = write_gguf(tmp_path / "s.gguf", built.model, built.cache, built.formats, built.source,
                      built.tokenizer)
    fields = gguf.GGUFReader(path).fields
    assert fields["llama.block_count"].contents() == 1
    assert fields["llama.feed_forward_length"].contents() == 128
    assert fields["llama.attention.head_count_kv"].contents() == 1
    assert fields["llama.attention.head_count"].contents() == 2
    ppl = float(np.exp(nll / n))
    assert abs(gguf_perplexity(str(path), windows) - ppl) / ppl < 0.01
    write_hf(tmp_path / "hf", built)
    again, _ = load_model(resolve_model(str(tmp_path / "hf")))
    assert again.config.intermediate_size == 128 and again.config.num_key_value_heads == 1
    ids = torch.from_numpy(windows[:2])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, built.model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("argv, match", [
    (["--student-blocks", "3,2"], "never larger than its teacher"),  # the teacher has 2
    (["--student-blocks", "0"], "never larger than its teacher"),
    (["--student-heads", "3"], r"\[1, 2\]"),  # 2 KV heads: 3 breaks the attention groups
    (["--student-mlp-ratios", "1.5"], "never larger than its teacher"),
    (["--student-blocks", "1.5"], "whole numbers"),
    (["--calib-tokens", "0"], "--calib-tokens > 0"),
    # per-block students (tests/test_per_block.py has the rest)
    (["--student-granularity", "block", "--calib-tokens", "0"], "--calib-tokens > 0"),
    (["--student-granularity", "layer"], "use model .* or block"),
    (["--student-granularity", "block", "--space", "formats"], "add students to --space"),
])
def test_bad_student_input_is_one_clear_error_and_stores_nothing(tiny_settings, tmp_path, capsys,
                                                                 argv, match):
    import re

    from llmpareto.cli import main

    base = ["search", "--model", tiny_settings["model"], "--runs-dir", str(tmp_path / "r"),
            "--study", "bad", "--space", "formats,students", "--trials", "3", "--window", "64",
            "--eval-tokens", "128", "--calib-tokens", "128", "--no-progress"]
    assert main(base + argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("llmpareto: error:") and re.search(match, last), last
    assert not (tmp_path / "r" / "bad" / "study.db").exists()
