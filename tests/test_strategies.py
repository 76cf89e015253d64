"""Search strategies end to end on the tiny model: the sensitivity profile, knapsack seeds,
level-switch evolution, budget repair, resume after a kill, and their bad input."""

import json

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import llmpareto
from llmpareto.cli import main
from llmpareto.errors import UserError
from llmpareto.search import allocate
from llmpareto.search.runner import TrialRunner
from llmpareto.search.sensitivity import KLScreen, measure, reference_params
from llmpareto.search.settings import SearchSettings
from llmpareto.search.strategies import EVOLVE_ATTR, make_sampler, plan


def _runner(tiny_settings, **kw) -> TrialRunner:
    return TrialRunner(SearchSettings(**{**tiny_settings, **kw}))


def test_suffix_forward_gives_the_whole_models_kl(tiny_settings):
    runner = _runner(tiny_settings, granularity="module")
    space = runner.space
    ref = space.recipe_from_params(reference_params(space))
    fast, whole = KLScreen(runner, 96, ref), KLScreen(runner, 96)
    whole.hidden = []  # no cached blocks: every candidate runs the whole model
    key = next(k for k in space.choices if k.startswith("model.layers.1."))
    recipe = space.recipe_from_params({**reference_params(space), key: "q4_0"})
    assert fast.first_block(recipe) == 1 and whole.first_block(recipe) == 0
    a, b = fast.kl(recipe), whole.kl(recipe)
    assert a > 0 and abs(a - b) <= 1e-6 * max(1.0, b) + 1e-9


def test_profile_ranks_choices_and_is_cached_in_the_run(tiny_settings, tmp_path):
    runner = _runner(tiny_settings)
    p = measure(runner)
    assert set(p["delta_kl_nats"]) == set(runner.space.choices)
    for k, choices in p["choices"].items():
        assert p["delta_kl_nats"][k][choices.index(p["reference"][k])] == 0.0
        d = dict(zip(choices, p["delta_kl_nats"][k]))
        assert d["tq2_0" if "tq2_0" in d else "q4_0"] > 10 * max(d["q8_0"], 1e-12)
    s = {**tiny_settings, "strategy": "knapsack", "trials": 9, "baselines": False}
    llmpareto.search(**s)
    run = tmp_path / "runs" / "t"
    saved = json.loads((run / "sensitivity.json").read_text())
    assert saved["choices"] == p["choices"]
    info = json.loads((run / "run.json").read_text())["strategy"]
    assert info["runs"] == "knapsack" and info["sensitivity"]["evaluations"] > 0
    # the view: a table and a heat-map
    code = main(["sensitivity", str(run), "--plot", str(tmp_path / "s.png")])
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0


def test_knapsack_seeds_make_a_front_from_the_first_trials(tiny_settings, tmp_path):
    s = {**tiny_settings, "strategy": "knapsack", "trials": 8, "baselines": False}
    front = llmpareto.search(**s)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'runs/t/study.db'}")
    seeds = [t for t in study.trials if t.user_attrs.get("seed")]
    assert len(seeds) >= 5 and all(t.state == TrialState.COMPLETE for t in seeds)
    budgets = [float(t.user_attrs["seed"].split("<=")[1].removesuffix("MB")) * 1e6
               for t in seeds]
    assert budgets[0] == max(budgets) and len(set(budgets)) == len(budgets)  # spread order
    assert all(t.user_attrs["memory_bytes"] <= b * 1.0005 for t, b in zip(seeds, budgets))
    assert len(front) >= 1  # (a random tiny model: KL ranks choices, perplexity barely)


def test_repair_keeps_every_proposal_within_the_budget(tiny_settings, tmp_path):
    runner = _runner(tiny_settings)
    sizes = [runner.cost_only(runner.space.recipe_from_params(p)).metrics["memory_bytes"]
             for _, p in runner.space.baselines()]
    budget = int(min(sizes) + 0.3 * (max(sizes) - min(sizes)))
    s = {**tiny_settings, "strategy": "random", "trials": 12, "baselines": False,
         "max_memory": budget}
    llmpareto.search(**s)
    repaired = pd.read_csv(tmp_path / "runs" / "t" / "trials.csv")
    llmpareto.search(**{**s, "study": "raw", "repair": False})
    raw = pd.read_csv(tmp_path / "runs" / "raw" / "trials.csv")
    assert repaired["feasible"].all() and (repaired["memory_bytes"] <= budget).all()
    assert not raw["feasible"].all()  # the same sampler without repair wastes trials


def test_evolve_proposals_stay_within_their_budgets(tiny_settings, tmp_path):
    s = {**tiny_settings, "strategy": "evolve", "trials": 14, "baselines": False, "sweep": 3}
    llmpareto.search(**s)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'runs/t/study.db'}")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 14 and all(t.user_attrs["feasible"] for t in done)
    assert 1 <= sum(1 for t in done if t.user_attrs.get("seed")) <= 3
    for t in done:  # an evolved child is made within its parent's budget
        if EVOLVE_ATTR in t.system_attrs:
            assert t.user_attrs["memory_bytes"] <= t.system_attrs[EVOLVE_ATTR] * (1 + 1e-12)


def test_evolution_improves_a_poor_parent_within_its_budget(tiny_settings):
    runner = _runner(tiny_settings, strategy="evolve", sweep=1)
    planner = plan(runner.settings, runner, None)
    m = planner.swept
    budget = planner.budgets(1)[0]
    # the poor parent: the allocation of *most* summed sensitivity that fits the budget
    worst = allocate.knapsack([[-v for v in row] for row in planner.values], planner.costs[m],
                              budget - planner.base[m])
    sampler = make_sampler(runner.settings, runner, planner, 8)
    study = optuna.create_study(directions=["minimize"] * 2, sampler=sampler)
    study.enqueue_trial(planner.params(worst))
    first = study.ask()
    result = runner.run(runner.space.suggest(first))
    for k, v in result.metrics.items():
        first.set_user_attr(k, v)
    first.set_user_attr("feasible", result.feasible)
    study.tell(first, [result.metrics["perplexity"], result.metrics["memory_bytes"]])
    child = study.ask()
    runner.space.suggest(child)
    assert study._storage.get_trial(child._trial_id).system_attrs[EVOLVE_ATTR] == budget
    sel = planner.selection(child.params)
    assert runner.cost_only(runner.space.recipe_from_params(child.params)).metrics[m] <= budget
    parent = allocate.snap(worst, planner.ladder, planner.costs[m])
    assert sampler._screen(1, sel) < sampler._screen(1, parent)  # elitism, on the screen


@pytest.mark.parametrize("strategy", ["knapsack", "evolve", "tpe", "random", "nsga2"])
def test_each_strategy_resumes_after_a_kill(strategy, tiny_settings, tmp_path, study_watch):
    s = {**tiny_settings, "study": "k", "trials": 14, "eval_tokens": 1024,
         "strategy": strategy}
    db = tmp_path / "runs" / "k" / "study.db"
    proc = study_watch.start_search(s)
    before = study_watch.kill_when_complete(proc, db, "k", 9, timeout_s=240)
    assert 9 <= len(before) < 14, "the kill should land mid-run"
    llmpareto.search(**{**s, "resume": True})
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 14
    after = {t.number: (t.values, t.params) for t in done}
    assert all(after[n] == v for n, v in before.items())  # nothing lost or rewritten
    for attr in ("baseline", "seed"):  # each enqueued recipe ran once
        labels = [t.user_attrs[attr] for t in done if t.user_attrs.get(attr)]
        assert len(labels) == len(set(labels))


def test_sampler_is_an_alias_of_strategy(tiny_settings):
    assert SearchSettings(**{**tiny_settings, "sampler": "tpe"}).strategy == "tpe"
    old = SearchSettings(**tiny_settings).to_dict()
    old.pop("strategy")
    old["sampler"] = "nsga2"  # a run.json written before --strategy existed
    assert SearchSettings.from_dict(old).strategy == "nsga2"
    with pytest.raises(UserError, match="old name of --strategy"):
        SearchSettings(**{**tiny_settings, "sampler": "tpe", "strategy": "evolve"})


def _cli(capsys, tiny_model_dir, tmp_path, *extra):
    code = main(["search", "--no-progress", "--model", str(tiny_model_dir), "--runs-dir",
                 str(tmp_path / "runs"), "--window", "64", "--eval-tokens", "256",
                 "--calib-tokens", "128", "--context", "512", "--presets", "none",
                 "--study", "bad", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--strategy", "knapsack", "--objectives", "perplexity,kl"], "fills budgets"),
    (["--strategy", "evolve", "--sweep", "0"], "leave out --sweep 0"),
    (["--strategy", "annealing"], "choose one of nsga2, tpe, random, knapsack, evolve, auto"),
])
def test_bad_strategy_input_is_one_line(capsys, tiny_model_dir, tmp_path, extra, match):
    code, err = _cli(capsys, tiny_model_dir, tmp_path, *extra)
    assert code == 2 and match in err and err.startswith("llmpareto: error:")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "bad" / "study.db").exists()


def test_profile_from_another_text_is_refused(capsys, tiny_model_dir, tmp_path, tiny_settings):
    llmpareto.search(**{**tiny_settings, "strategy": "knapsack", "trials": 2,
                        "baselines": False, "study": "a"})
    profile = tmp_path / "runs" / "a" / "sensitivity.json"
    text = tmp_path / "other.txt"
    text.write_text(" ".join(f"word{i % 97} and more words {i}" for i in range(3000)))
    code, err = _cli(capsys, tiny_model_dir, tmp_path, "--formats",
                     tiny_settings["formats"], "--strategy", "knapsack", "--sensitivity",
                     str(profile), "--text", str(text))
    assert code == 2 and "calibration text" in err and str(profile) in err
    lines = err.strip().splitlines()  # (after transformers' own loading bar)
    assert lines[-1].startswith("llmpareto: error:") and "Traceback" not in err
    assert sum("llmpareto: error:" in line for line in lines) == 1
    assert not (tmp_path / "runs" / "bad" / "sensitivity.json").exists()
    # the same profile for another space (module granularity) is refused too
    with pytest.raises(UserError, match="space choices"):
        llmpareto.search(**{**tiny_settings, "strategy": "knapsack", "study": "b",
                            "granularity": "module", "sensitivity": str(profile)})


def test_profile_of_another_model_is_refused(tiny_settings, tmp_path):
    llmpareto.search(**{**tiny_settings, "strategy": "knapsack", "trials": 2,
                        "baselines": False, "study": "a"})
    data = json.loads((tmp_path / "runs" / "a" / "sensitivity.json").read_text())
    data["model_sha256"] = "0" * 64  # as a profile of other weights would say
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(UserError, match="another model weights"):
        llmpareto.search(**{**tiny_settings, "strategy": "knapsack", "study": "b",
                            "sensitivity": str(other)})


def test_knapsack_sweeps_predicted_latency_when_it_is_the_cost(tiny_settings, tmp_path):
    s = {**tiny_settings, "strategy": "knapsack", "trials": 6, "baselines": False,
         "objectives": "perplexity,latency_ms", "device": "jetson-orin-nano-8gb"}
    llmpareto.search(**s)
    trials = pd.read_csv(tmp_path / "runs" / "t" / "trials.csv")
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'runs/t/study.db'}")
    labels = [t.user_attrs["seed"] for t in study.trials if t.user_attrs.get("seed")]
    assert labels and all(label.startswith("knapsack latency_ms<=") for label in labels)
    budgets = [float(label.split("<=")[1]) for label in labels]
    got = trials.set_index("trial")["latency_ms"]
    seeded = [t.number for t in study.trials if t.user_attrs.get("seed")]
    assert all(got[n] <= b * 1.001 for n, b in zip(seeded, budgets))
