"""End to end on the tiny model: run directory, baselines, budgets, front, reproducibility."""

import json

import numpy as np
import optuna
import pandas as pd
import pytest

import llmpareto
from llmpareto.front import Front
from llmpareto.pareto import non_dominated
from llmpareto.recipe import Recipe
from llmpareto.rundir import RunDir
from llmpareto.search.records import front_size, trials_frame


def test_search_writes_the_run_directory_and_a_true_front(tiny_settings, tmp_path):
    front = llmpareto.search(**tiny_settings)
    run = tmp_path / "runs" / "t"
    for name in ("study.db", "run.json", "trials.csv", "front.csv", "front.json", "front.png"):
        assert (run / name).is_file(), name
    trials = pd.read_csv(run / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() == 10
    # every uniform baseline ran first, in order
    labels = trials["baseline"].fillna("").tolist()
    assert labels[:7] == [f"uniform {f}" for f in ("f16", "q8_0", "q5_1", "q5_0", "q4_1",
                                                   "q4_0", "tq2_0")]
    # the front is exactly the non-dominated subset of the feasible trials
    obj = ["perplexity", "memory_bytes"]
    expected = set(trials["trial"][non_dominated(trials[obj].to_numpy(float))])
    assert set(front.df["trial"]) == expected
    # each trial's recipe is on disk and reproduces its memory
    info = json.loads((run / "run.json").read_text())
    assert info["settings"]["trials"] == 10 and info["versions"]["optuna"]
    # codecarbon's offline tracker measured the search (a broken codecarbon fails here)
    energy = info["search_energy"]
    assert "error" not in energy, energy
    assert energy["energy_kwh"] > 0 and energy["co2_kg"] > 0 and energy["duration_s"] > 0
    r = Recipe.load(run / "recipes" / "0.json")
    assert {c["format"] for c in r.modules.values()} == {"f16"}
    mem = trials.set_index("baseline")["memory_bytes"]
    assert mem["uniform f16"] > mem["uniform q8_0"] > mem["uniform q4_0"] > mem["uniform tq2_0"]
    assert list(pd.read_csv(run / "front.csv").columns)[:4] == ["trial", "state", "feasible",
                                                               "baseline"]
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{run / 'study.db'}")
    assert study.metric_names == obj  # optuna-dashboard names the axes, not "Objective 0/1"
    assert front_size(study) == len(front)


def test_progress_front_size_counts_a_repeated_recipe_once(tmp_path):
    dist = {"a": optuna.distributions.CategoricalDistribution(["q8_0", "q4_0"])}
    study = optuna.create_study(directions=["minimize", "minimize"])
    for fmt, values in (("q8_0", [1.0, 2.0]), ("q8_0", [1.0, 2.0]), ("q4_0", [2.0, 1.0])):
        attrs = {"feasible": True, "perplexity": values[0], "memory_bytes": values[1]}
        study.add_trial(optuna.trial.create_trial(params={"a": fmt}, distributions=dist,
                                                  values=values, user_attrs=attrs))
    assert len(study.best_trials) == 3  # Optuna counts the repeat
    rd = RunDir(tmp_path / "r")
    rd.create()
    printed = Front.from_trials(trials_frame(study, rd), ["perplexity", "memory_bytes"])
    assert front_size(study) == len(printed) == 2  # the progress bar counts as the printout


def test_version_flag_names_what_reproducing_a_run_needs(capsys):
    from llmpareto.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"llmpareto {llmpareto.__version__}")
    for name in ("torch", "transformers", "optuna", "ray", "llama-cpp-python"):
        assert f"  {name} " in out, name


def _uniform_memory(model_dir, fmt, settings):
    from transformers import AutoConfig

    from llmpareto.arch import Arch
    from llmpareto.budget import Workload
    from llmpareto.evaluators import Candidate, MemoryEvaluator

    arch = Arch.from_config(AutoConfig.from_pretrained(model_dir))
    w = Workload(prompt_tokens=settings.get("prompt_tokens", 128), context=settings["context"])
    r = Recipe.uniform(fmt)
    return MemoryEvaluator(arch, w).evaluate(Candidate(r, arch.formats_for(r)))["memory_bytes"]


def test_over_budget_candidates_never_run_a_forward_pass(tiny_settings, monkeypatch):
    from llmpareto.evaluators import quality

    calls = []
    real = quality.window_nll
    monkeypatch.setattr(quality, "window_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    limit = (_uniform_memory(tiny_settings["model"], "q8_0", tiny_settings)
             + _uniform_memory(tiny_settings["model"], "q5_1", tiny_settings)) / 2
    front = llmpareto.search(**{**tiny_settings, "max_memory": int(limit), "trials": 12})
    trials = front.trials
    over = trials[~trials["feasible"]]
    assert {"uniform f16", "uniform q8_0"} <= set(over["baseline"])
    assert "uniform q5_1" not in set(over["baseline"])
    assert over["perplexity"].isna().all() and (over["memory_bytes"] > limit).all()
    assert len(calls) == int(trials["feasible"].sum())
    assert (front.df["memory_bytes"] <= limit).all() and len(front) >= 1


def test_same_seed_same_trials(tiny_settings, tmp_path):
    a = llmpareto.search(**{**tiny_settings, "study": "a", "baselines": False, "trials": 6})
    b = llmpareto.search(**{**tiny_settings, "study": "b", "baselines": False, "trials": 6})
    cols = [c for c in a.trials.columns if c.startswith("param:")] + ["perplexity"]
    pd.testing.assert_frame_equal(a.trials[cols], b.trials[cols])


def test_a_run_of_baselines_only_says_so(tiny_settings, capsys):
    llmpareto.search(**{**tiny_settings, "study": "few", "trials": 5})
    err = capsys.readouterr().err
    assert "--trials 5 runs baselines only (5 of the 7 uniform recipes" in err
    assert "--trials 17 searches 10 points" in err
    llmpareto.search(**{**tiny_settings, "study": "enough", "trials": 8})
    assert "baselines only" not in capsys.readouterr().err


def test_kl_objective_and_module_granularity(tiny_settings):
    front = llmpareto.search(**{**tiny_settings, "objectives": "kl,memory_bytes",
                                "granularity": "module", "trials": 9})
    t = front.trials.set_index("baseline")
    assert t.loc["uniform f16", "kl_nats"] < t.loc["uniform q4_0", "kl_nats"]
    assert t.loc["uniform f16", "kl_nats"] >= 0 and np.isnan(t["perplexity"]).all()
    params = [c for c in front.trials.columns if c.startswith("param:")]
    assert len(params) == 2 * 7 + 1  # 7 projections x 2 layers + the (tied) embedding


def test_device_latency_objective_and_budget(tiny_settings):
    base = llmpareto.search(**{**tiny_settings, "study": "lat0", "trials": 7,
                               "device": "raspberry-pi-5",
                               "objectives": "perplexity,latency_ms"})
    lat = base.trials.set_index("baseline")["latency_ms"]
    assert lat["uniform q4_0"] < lat["uniform q8_0"] < lat["uniform f16"]
    limit = (lat["uniform q8_0"] + lat["uniform q5_1"]) / 2
    front = llmpareto.search(**{**tiny_settings, "study": "lat1", "trials": 9,
                                "device": "raspberry-pi-5", "max_latency_ms": limit,
                                "objectives": "perplexity,latency_ms,energy_mj"})
    t = front.trials
    assert not t.set_index("baseline").loc["uniform q8_0", "feasible"]
    assert (front.df["latency_ms"] <= limit).all() and front.df["energy_mj"].gt(0).all()
    assert t.loc[~t["feasible"], "perplexity"].isna().all()


def test_a_repeated_candidate_is_scored_once(tiny_settings, monkeypatch):
    from llmpareto.evaluators import quality
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    runner = TrialRunner(SearchSettings.from_dict(tiny_settings))
    calls = []
    real = quality.window_nll
    monkeypatch.setattr(quality, "window_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = runner.run(Recipe.uniform("q4_0"))
    # written differently, same effective formats: the same candidate
    again = runner.run(Recipe({"re:.*": {"format": "q4_0"}}))
    assert len(calls) == 1 and again.reused and not first.reused
    assert again.metrics == first.metrics
    other = runner.run(Recipe.uniform("q8_0"))
    assert len(calls) == 2 and not other.reused


def test_fit_caches_lowers_the_bounds_in_proportion_and_keeps_a_floor():
    from llmpareto.search.workbench import MIN_CACHE_BYTES, fit_caches

    assert fit_caches(4 * 10**9, 4 * 10**9, 10**10) == (4 * 10**9, 4 * 10**9)  # fits: as asked
    dense, packed = fit_caches(3 * 10**9, 1 * 10**9, 2 * 10**9)
    assert (dense, packed) == (1_500_000_000, 500_000_000)  # halved, in proportion
    assert fit_caches(4 * 10**9, 4 * 10**9, -5) == (MIN_CACHE_BYTES, MIN_CACHE_BYTES)
    assert fit_caches(0, 4 * 10**9, 10**9) == (0, 10**9)  # a cache turned off stays off


def test_variant_caches_that_would_not_fit_the_host_are_lowered_with_a_note(
        tiny_settings, monkeypatch, capsys):
    """The default bounds (4 GB + 4 GB) on a host with 2 GiB available: the run keeps less,
    says so, and still scores; with memory to spare the bounds stay as asked, silently."""
    from llmpareto import models
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    runner = TrialRunner(SearchSettings.from_dict(tiny_settings))
    assert (runner.cache.dense_bytes, runner.cache.packed_bytes) == (4 * 10**9, 4 * 10**9)
    assert "would not fit" not in capsys.readouterr().err
    monkeypatch.setattr(models, "available_memory_bytes", lambda: 2 * 2**30)
    small = TrialRunner(SearchSettings.from_dict(tiny_settings))
    held = small.cache.dense_bytes + small.cache.packed_bytes
    assert held <= 0.8 * 2 * 2**30 and small.cache.dense_bytes == small.cache.packed_bytes
    err = capsys.readouterr().err
    assert "llmpareto: note: --dequant-cache 4.0 GB and --variant-cache 4.0 GB would not fit" \
        in err, err
    assert small.run(Recipe.uniform("q4_0")).metrics == runner.run(Recipe.uniform("q4_0")).metrics


def test_a_worker_plans_its_caches_on_its_share_of_the_node(tiny_settings, monkeypatch,
                                                             capsys):
    """Ray runs several trials on a node at once, each worker with its own caches: each
    plans on one over the trials the node runs at once, said in the note."""
    from llmpareto import models
    from llmpareto.placement import node_share
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    assert node_share({"CPU": 16.0}, 2.0) == 1 / 8
    assert node_share({"CPU": 16.0}, 2.0, max_concurrent=2) == 1 / 2
    assert node_share({"CPU": 16.0, "GPU": 2.0}, 2.0, 0.5) == 1 / 4  # the GPUs bind first
    assert node_share({"CPU": 1.0}, 2.0) == 1.0  # one trial, on a node smaller than it asks
    assert node_share({"CPU": 3.0}, 1.0) == 1 / 3
    monkeypatch.setattr(models, "available_memory_bytes", lambda: 16 * 2**30)
    whole = TrialRunner(SearchSettings.from_dict(tiny_settings))
    assert whole.cache.dense_bytes + whole.cache.packed_bytes == 8 * 10**9
    capsys.readouterr()
    part = TrialRunner(SearchSettings.from_dict(tiny_settings), memory_share=1 / 8)
    assert part.cache.dense_bytes + part.cache.packed_bytes <= 0.8 * 16 * 2**30 / 8
    assert "this worker's share (0.125: the trials run at once here) of the 17.2 GB" in \
        capsys.readouterr().err


def test_energy_that_cannot_be_measured_is_said_in_one_line(monkeypatch, capsys):
    import codecarbon

    from llmpareto.search.session import emissions

    class Broken:
        def __init__(self, **kwargs):
            raise RuntimeError("no power source readable")

    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", Broken)
    with emissions("USA") as energy:
        pass
    assert energy == {"error": "codecarbon unavailable: no power source readable"}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("llmpareto: note: the search's energy and CO2 are missing from run.json "
                    "(codecarbon unavailable: no power source readable)")]
