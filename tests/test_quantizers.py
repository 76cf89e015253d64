"""Quantizers in a search: the importance matrix (computed, written, read back), GPTQ, the
on-disk variants, llama.cpp's presets as baselines, and exports that are the searched weights."""

import json

import gguf
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

import llmpareto
from llmpareto.compress import VariantCache
from llmpareto.compress.calibration import blockwise_stats, collect_input_stats
from llmpareto.compress.imatrix import read_imatrix, to_modules
from llmpareto.export.pick import pick
from llmpareto.gguf_write import gguf_name, unpermute_rows
from llmpareto.recipe import Recipe
from llmpareto.search.workbench import Workbench
from llmpareto.tiny import build_tiny_model

WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Rows of 256 and 512: the K-quants apply without falling back."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "m", **WIDE)


def _settings(wide_dir, runs, study, **kw):
    return {"model": str(wide_dir), "runs_dir": str(runs), "study": study, "window": 64,
            "eval_tokens": 256, "calib_tokens": 320, "trials": 6, "progress": False,
            "context": 256, "presets": "none", **kw}


@pytest.fixture(scope="module")
def imatrix_run(wide_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("disk")
    llmpareto.search(**_settings(wide_dir, runs, "im", disk_cache=str(cache),
                                 formats="q8_0,q6_K,q4_K,q3_K,iq4_xs,q2_K", presets="Q4_K_M,Q3_K_S",
                                 trials=10, granularity="module"))
    return runs / "im", cache


def test_the_run_writes_its_importance_matrix_for_llama_quantize(imatrix_run):
    run, _ = imatrix_run
    info = json.loads((run / "run.json").read_text())
    assert info["quantizer"]["quantizer"] == "imatrix" and info["quantizer"]["disk_saved"] > 0
    rb = Workbench.from_run(run)
    ours = rb.cache.quantizer.imatrix
    back = to_modules(read_imatrix(run / "imatrix.gguf"), list(ours), WIDE["num_hidden_layers"])
    assert set(back) == set(ours) and len(ours) == len(rb.cache.arch.tensors)
    for fqn, v in ours.items():  # mean = sum x^2 / tokens, through the file's sums and counts
        np.testing.assert_allclose(back[fqn], v, rtol=1e-6)
    # the statistic is the mean squared input of each linear on the calibration windows
    w = rb.windows.calib
    fqn = "model.layers.1.mlp.down_proj"
    s = collect_input_stats(rb.model, w, [fqn], diag_only=True)[fqn]
    np.testing.assert_allclose(ours[fqn], (s.xtx / s.tokens).numpy(), rtol=1e-4)
    assert s.tokens == w.size


def test_presets_are_baselines_with_llama_cpp_types(imatrix_run):
    from llmpareto.spaces.presets import llama_cpp_presets

    run, _ = imatrix_run
    trials = pd.read_csv(run / "trials.csv")
    labels = [b for b in trials["baseline"].fillna("") if b.startswith("llama.cpp")]
    assert labels == ["llama.cpp Q4_K_M imatrix", "llama.cpp Q3_K_S imatrix"]
    rb = Workbench.from_run(run)
    chosen = llama_cpp_presets(rb.model, rb.cache, rb.source, rb.tokenizer, ["Q4_K_M"],
                               imatrix=rb.cache.quantizer.imatrix)["Q4_K_M"]
    row = trials[trials["baseline"] == "llama.cpp Q4_K_M imatrix"].iloc[0]
    recipe = Recipe.load(run / row["recipe"])
    assert {f: c["format"] for f, c in recipe.modules.items()} == chosen
    assert len(set(chosen.values())) >= 2  # llama.cpp mixes types: not a uniform recipe


def test_the_knapsack_seeds_a_point_at_each_presets_size(imatrix_run):
    """The first knapsack seeds are budgeted at the presets' own memory (what a user compares
    the front against), each within it; the run is a knapsack run with two seeds left."""
    run, _ = imatrix_run
    study = optuna.load_study(study_name="im", storage=f"sqlite:///{run / 'study.db'}")
    assert json.loads((run / "run.json").read_text())["strategy"]["runs"] == "knapsack"
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    presets = {t.user_attrs["baseline"]: t.user_attrs["memory_bytes"] for t in done
               if str(t.user_attrs.get("baseline", "")).startswith("llama.cpp ")}
    seeds = {t.user_attrs["seed"]: t.user_attrs["memory_bytes"] for t in done
             if t.user_attrs.get("seed")}
    assert len(presets) == 2 and len(seeds) == 2
    for label, memory in presets.items():
        seed = next(s for s in seeds if s.endswith(f"(at {label})"))
        budget = float(seed.split("<=")[1].split("MB")[0]) * 1e6
        assert abs(budget - memory) <= 0.0005 * memory  # the label's 4 digits
        assert seeds[seed] <= memory


def test_a_second_run_reads_its_variants_from_disk_and_scores_the_same(imatrix_run, wide_dir,
                                                                       tmp_path):
    run, cache = imatrix_run
    llmpareto.search(**_settings(wide_dir, tmp_path, "again", disk_cache=str(cache),
                                 formats="q8_0,q6_K,q4_K,q3_K,iq4_xs,q2_K", trials=10,
                                 presets="Q4_K_M,Q3_K_S", granularity="module"))
    info = json.loads((tmp_path / "again" / "run.json").read_text())["quantizer"]
    assert info["disk_loaded"] > 0 and info["disk_saved"] == 0
    a = pd.read_csv(run / "trials.csv").set_index("trial")["perplexity"]
    b = pd.read_csv(tmp_path / "again" / "trials.csv").set_index("trial")["perplexity"]
    pd.testing.assert_series_equal(a, b)


def _gguf_matches_model(path, built):
    """Every tensor of the GGUF dequantizes to exactly the built model's weights."""
    cfg = built.model.config
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    types = set()
    for name, p in built.model.named_parameters():
        t = tensors[gguf_name(name, cfg.num_hidden_layers)]
        types.add(t.tensor_type.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
        for proj, heads in (("q_proj", cfg.num_attention_heads),
                            ("k_proj", cfg.num_key_value_heads)):
            if proj in name:
                w = unpermute_rows(w, heads)
        np.testing.assert_allclose(w, p.detach().numpy(), rtol=0, atol=0, err_msg=name)
    return types


@pytest.mark.parametrize("quantizer,formats", [("imatrix", "q6_K,q4_K,q3_K,iq4_xs,q2_K"),
                                               ("gptq", "q8_0,q5_0,q4_1,q4_0")])
def test_k_quant_and_gptq_exports_are_the_searched_weights_and_run_in_llama_cpp(
        wide_dir, tmp_path, quantizer, formats):
    from llmpareto.evaluators.llamacpp import gguf_perplexity

    front = llmpareto.search(**_settings(wide_dir, tmp_path, quantizer, quantizer=quantizer,
                                         formats=formats, granularity="module", trials=6,
                                         baselines=False,  # a front of mixed recipes
                                         calib_tokens=640))  # gptq: >= 512, the widest input
    trial = max(front.df["trial"], key=lambda t: len({c["format"] for c in
                                                      front.recipe(int(t)).modules.values()}))
    out = pick(tmp_path / quantizer, tmp_path / "x", trial=int(trial), formats="gguf")
    rb = Workbench.from_run(tmp_path / quantizer)
    built = rb.build(front.recipe(int(trial)))
    types = _gguf_matches_model(out / "model.gguf", built)
    assert len(types - {"F32"}) >= 2
    searched = float(front.df.set_index("trial").loc[trial, "perplexity"])
    measured = gguf_perplexity(str(out / "model.gguf"), rb.windows.eval)
    assert abs(measured - searched) / searched < 0.01


def test_gptq_variants_are_on_the_grid_and_beat_rtn_on_the_layer_output(wide_dir, tmp_path):
    from llmpareto.arch import Arch
    from llmpareto.compress.quantizers import setup_quantizer
    from llmpareto.formats import get_format
    from llmpareto.models import load_model, resolve_model

    model, _ = load_model(resolve_model(str(wide_dir)))
    cache = VariantCache(model, Arch.from_model(model))
    calib = np.random.default_rng(0).integers(3, 1000, (8, 64))
    setup_quantizer(cache, calib, "x", quantizer="gptq", batch_size=4, disk_cache="off")
    fqn = "model.layers.0.mlp.down_proj"
    stats = cache.quantizer.stats[fqn]
    h = stats.xtx.float()
    for fmt in ("q4_0", "q8_0", "q4_1"):
        f = get_format(fmt)
        packed = cache.get(fqn, fmt)
        w = torch.from_numpy(f.dequantize(packed, cache.shapes[fqn]))
        assert np.array_equal(f.quantize(w.numpy()), packed)  # exactly on the grid
        rtn = torch.from_numpy(f.dequantize(f.quantize(cache.base[fqn].numpy()),
                                            cache.shapes[fqn]))

        def err(q):
            d = (q - cache.base[fqn]).double()
            return float(torch.einsum("ij,jk,ik->", d, stats.xtx, d))
        assert err(w) <= err(rtn)
    assert h.shape == (512, 512)


def test_blockwise_statistics_equal_one_whole_model_pass(wide_dir):
    from llmpareto.models import load_model, resolve_model

    model, _ = load_model(resolve_model(str(wide_dir)))
    windows = np.random.default_rng(1).integers(3, 1000, (6, 48))
    fqns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and ".layers." in n]
    whole = collect_input_stats(model, windows, fqns, diag_only=False, batch_size=4)
    blocks = blockwise_stats(model, windows, 4, fqns, diag_only=False)
    for fqn in fqns:
        assert blocks[fqn].tokens == whole[fqn].tokens == windows.size
        torch.testing.assert_close(blocks[fqn].xtx, whole[fqn].xtx, rtol=1e-6, atol=1e-6)
