"""--space sparsity and --space formats,sparsity on the tiny model: end to end, honest cost on a
device whose runtime gains nothing from zeros, and bad input refused before anything runs."""

import json

import pandas as pd
import pytest

import llmpareto
from llmpareto.arch import Arch
from llmpareto.cli import main
from llmpareto.models import load_model, resolve_model
from llmpareto.recipe import Recipe
from llmpareto.spaces import build_space


def test_sparsity_search_runs_with_uniform_baselines_and_dense_cost(tiny_settings, tmp_path):
    front = llmpareto.search(**{**tiny_settings, "space": "sparsity", "trials": 9,
                                "sparsity_levels": "0,0.25,0.5"})
    t = front.trials.set_index("trial")
    assert t["baseline"].fillna("").tolist()[:2] == ["uniform 25% wanda", "uniform 50% wanda"]
    assert any(c.startswith("param:sparsity:") for c in t.columns)
    # raspberry-pi-5's llama.cpp has no sparse kernels: pruned recipes cost what dense ones do
    assert t["memory_bytes"].nunique() == 1 and t["latency_ms"].nunique() == 1
    r = Recipe.load(tmp_path / "runs" / "t" / "recipes" / "1.json")
    assert r.sparsity_of("model.layers.0.mlp.up_proj") == ("unstructured", 0.5)
    assert r.format_of("model.embed_tokens") == "f16"  # everything stored as f16
    info = json.loads((tmp_path / "runs" / "t" / "run.json").read_text())
    assert info["space"]["method"] == "wanda" and info["settings"]["sparsity_levels"] == [
        0.0, 0.25, 0.5]


def test_joint_formats_sparsity_search_prunes_then_quantizes(tiny_settings, tmp_path):
    front = llmpareto.search(**{**tiny_settings, "space": "formats,sparsity", "trials": 11,
                                "sparsity_method": "sparsegpt", "sparsity_pattern": "2:4",
                                "granularity": "block", "formats": None})
    labels = front.trials["baseline"].fillna("").tolist()
    # 2:4 must survive quantization: the default formats lose the asymmetric q5_1 and q4_1
    zeros = ("f16", "q8_0", "q6_K", "q5_0", "q4_0", "q3_K", "tq2_0")
    assert labels[:7] == [f"uniform {f}" for f in zeros]
    assert labels[7] == "uniform 2:4 sparsegpt + f16"
    r = Recipe.load(tmp_path / "runs" / "t" / "recipes" / "7.json")
    assert r.resolve("model.layers.1.mlp.down_proj") == {"format": "f16", "pattern": "2:4"}
    done = front.trials[front.trials["state"] == "COMPLETE"]
    assert len(done) == 11 and done["perplexity"].notna().all() and len(front) >= 1


def test_sparsity_space_choices_by_pattern_and_granularity(tiny_model_dir):
    model, _ = load_model(resolve_model(str(tiny_model_dir)))
    arch = Arch.from_model(model)
    nm = build_space("sparsity", arch, pattern="4:8", granularity="module")
    assert len(nm.choices) == len(arch.linears)
    assert all(c == [0.0, 0.5] for c in nm.choices.values())
    joint = build_space("formats,sparsity", arch, formats=["q8_0", "q4_0"], levels=[0, 0.3])
    recipe = joint.recipe_from_params({k: c[-1] for k, c in joint.choices.items()})
    assert recipe.resolve("model.layers.0.self_attn.k_proj") == {
        "format": "q4_0", "pattern": "unstructured", "sparsity": 0.3}
    assert recipe.sparsity_of("model.embed_tokens") is None


@pytest.mark.parametrize("argv, match", [
    (["--sparsity-levels", "0,1.2"], r"in \[0, 1\)"),
    (["--sparsity-pattern", "4:2"], "N < M"),
    (["--sparsity-pattern", "3:5"], "5 does not divide"),
    (["--sparsity-method", "obs"], "magnitude, wanda, sparsegpt"),
    (["--calib-tokens", "0"], "--calib-tokens > 0"),
    (["--space", "formats,sparsity", "--sparsity-pattern", "2:4", "--formats", "q8_0,q4_1"],
     "--formats q4_1: .*pattern is lost"),
])
def test_bad_sparsity_input_is_one_clear_error_and_stores_nothing(tiny_settings, tmp_path,
                                                                  capsys, argv, match):
    base = ["search", "--model", tiny_settings["model"], "--runs-dir", str(tmp_path / "r"),
            "--study", "bad", "--space", "sparsity", "--trials", "3", "--window", "64",
            "--eval-tokens", "128", "--no-progress"]
    assert main(base + argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any load progress bar
    assert last.startswith("llmpareto: error:") and pd.Series([last]).str.contains(match).all()
    assert not (tmp_path / "r" / "bad" / "study.db").exists()


def test_pick_rebuilds_a_pruned_trial_exactly_as_the_search_scored_it(tiny_settings, tmp_path):
    import math

    from llmpareto.evaluators.quality import window_nll
    from llmpareto.search.workbench import Workbench

    front = llmpareto.search(**{**tiny_settings, "space": "sparsity", "trials": 3,
                                "sparsity_levels": "0,0.5"})
    run = tmp_path / "runs" / "t"
    trial = 0  # the baseline: every projection at 50% Wanda
    assert Recipe.load(run / "recipes" / "0.json").sparsity_of("model.layers.1.mlp.up_proj")
    rb = Workbench.from_run(run)
    built = rb.build(Recipe.load(run / "recipes" / f"{trial}.json"))
    nll, n = window_nll(built.model, rb.windows.eval, tiny_settings.get("batch_size", 4))
    searched = float(front.trials.set_index("trial").loc[trial, "perplexity"])
    assert math.exp(nll / n) == pytest.approx(searched, rel=1e-9)
    up = built.model.get_submodule("model.layers.1.mlp.up_proj").weight
    assert int((up == 0).sum()) == round(0.5 * up.numel())
