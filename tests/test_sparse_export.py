"""A sparse recipe's exports: GGUF keeps the pruned zeros bit for bit; the HF export is
compressed-tensors (sparse-24-bitmask / sparse-bitmask) and reloads with the searched weights."""

import json

import gguf
import numpy as np
import pytest
import torch

import llmpareto
from llmpareto.export.hf import write_hf
from llmpareto.export.pick import pick
from llmpareto.gguf_write import gguf_name, unpermute_rows, write_gguf
from llmpareto.models import load_model, resolve_model
from llmpareto.recipe import Recipe
from llmpareto.search.workbench import Workbench


@pytest.fixture(scope="module")
def joint_run(tiny_model_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    llmpareto.search(model=str(tiny_model_dir), runs_dir=str(runs), study="j", window=64,
                     eval_tokens=128, calib_tokens=128, trials=5, progress=False, context=256,
                     space="formats,sparsity", formats="q8_0,q4_0,f16", sparsity_pattern="2:4")
    return runs / "j"


def _reload_matches(folder, built):
    again, _ = load_model(resolve_model(str(folder)))  # llmpareto's loader decompresses
    ref = dict(built.model.named_parameters())
    for name, p in again.named_parameters():
        assert torch.equal(p, ref[name]), name
    ids = torch.randint(0, built.model.config.vocab_size, (2, 16), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        a, b = again(ids).logits, built.model(ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_2_4_recipe_exports_gguf_zeros_and_sparse_24_bitmask(joint_run, tmp_path):
    recipe = Recipe.load(joint_run / "recipes" / "3.json")  # uniform 2:4 wanda + q8_0
    assert recipe.resolve("model.layers.0.mlp.up_proj") == {"format": "q8_0", "pattern": "2:4"}
    built = Workbench.from_run(joint_run).build(recipe)
    cfg = built.model.config
    path = write_gguf(tmp_path / "m.gguf", built.model, built.cache, built.formats, built.source,
                      built.tokenizer)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for fqn in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        p = built.model.get_submodule(fqn).weight.detach().numpy()
        t = tensors[gguf_name(fqn + ".weight", cfg.num_hidden_layers)]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
        if "k_proj" in fqn:
            w = unpermute_rows(w, cfg.num_key_value_heads)
        assert t.tensor_type.name == "Q8_0"
        assert np.array_equal(w.view(np.uint32), p.view(np.uint32)), fqn  # zeros included
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(2) <= 2).all())
    kind = write_hf(tmp_path / "hf", built)
    assert kind == "sparse-24-bitmask"
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    assert "model.layers.0.mlp.up_proj" not in qc["sparsity_config"]["ignore"]
    _reload_matches(tmp_path / "hf", built)
    dense = tmp_path / "dense"
    assert write_hf(dense, Workbench.from_run(joint_run).build(Recipe.uniform("q8_0"))) == "dense"
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size < \
        0.8 * (dense / "model.safetensors").stat().st_size


def test_unstructured_recipe_is_sparse_bitmask_and_pick_card_says_so(tiny_settings, tmp_path):
    llmpareto.search(**{**tiny_settings, "space": "sparsity", "trials": 4,
                        "sparsity_levels": "0,0.5", "objectives": "perplexity,nonzero_params"})
    run = tmp_path / "runs" / "t"
    out = pick(run, tmp_path / "out", best="nonzero_params")  # the most pruned front point
    qc = json.loads((out / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "sparse-bitmask"
    card = (out / "README.md").read_text()
    assert "## Sparsity" in card and "dense speed" in card and "sparse-bitmask" in card
    recipe = Recipe.load(out / "recipe.json")
    built = Workbench.from_run(run).build(recipe)
    _reload_matches(out / "hf", built)
    up = built.model.get_submodule("model.layers.0.mlp.up_proj").weight
    if recipe.sparsity_of("model.layers.0.mlp.up_proj"):
        assert int((up == 0).sum()) == round(0.5 * up.numel())


def test_layout_is_what_compressed_tensors_0_14_writes_and_reads():
    """The last compressed-tensors with sparse compressors (0.14.0.1, which needs transformers<5,
    so tests/setup.sh installs it into its own folder): its writer makes the same tensors, its
    reader restores ours bit for bit (bench/check_compressed_tensors.py, run here)."""
    from llmpareto.bench import check_compressed_tensors as ct
    from llmpareto.tests.clusters import missing

    if not ct.installed():
        missing(f"compressed-tensors {ct.VERSION} is not in {ct.REFERENCE}: {ct.INSTALL} "
                "(tests/setup.sh does it)")
    assert ct.run() == 0
