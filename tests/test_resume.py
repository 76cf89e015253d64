"""Resume: a search killed mid-run keeps every completed trial and repeats none."""

import subprocess
import sys
import time

import optuna
import pandas as pd
from optuna.trial import TrialState

import llmpareto


def test_killed_search_resumes_without_loss_or_duplicates(tiny_settings, tmp_path, study_watch):
    s = {**tiny_settings, "study": "k", "trials": 16, "eval_tokens": 1024}
    db = tmp_path / "runs" / "k" / "study.db"
    proc = study_watch.start_search(s)
    before = study_watch.kill_when_complete(proc, db, "k", 5, timeout_s=180)
    assert 5 <= len(before) < 16, "the kill should land mid-run"

    front = llmpareto.search(**{**s, "resume": True})
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 16
    after = {t.number: (t.values, t.params) for t in done}
    assert all(after[n] == v for n, v in before.items())  # nothing lost or rewritten
    labels = [t.user_attrs.get("baseline") for t in done if t.user_attrs.get("baseline")]
    assert sorted(labels) == sorted(set(labels)) and len(labels) == 7  # each baseline once
    trials = pd.read_csv(tmp_path / "runs" / "k" / "trials.csv")
    assert trials["trial"].is_unique and len(trials) == len(study.trials)
    assert set(front.df["trial"]) <= set(after)


def test_trial_cut_off_while_running_is_failed_and_baseline_requeued(tiny_settings, tmp_path):
    s = {**tiny_settings, "study": "cut", "trials": 3}
    llmpareto.search(**s)  # baselines f16, q8_0, q5_1 done; 4 more still enqueued
    db = tmp_path / "runs" / "cut" / "study.db"
    study = optuna.load_study(study_name="cut", storage=f"sqlite:///{db}")
    cut = study.ask()  # takes the next enqueued baseline, as a killed run would leave it
    label = cut.user_attrs["baseline"]
    llmpareto.search(**{**s, "trials": 7, "resume": True})
    study = optuna.load_study(study_name="cut", storage=f"sqlite:///{db}")
    assert study.trials[cut.number].state == TrialState.FAIL
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 7
    labels = [t.user_attrs.get("baseline") for t in done]
    assert labels.count(label) == 1 and len(set(labels)) == 7  # every baseline exactly once


_OPEN = """
import sys, time
import optuna
from llmpareto.rundir import RunDir
from llmpareto.search.study import open_study
from llmpareto.search.settings import SearchSettings
rd = RunDir.for_study(sys.argv[1], "race")
rd.create()
while time.time() < float(sys.argv[2]):  # start together
    pass
study = open_study(rd, SearchSettings(study="race"), optuna.samplers.RandomSampler())
print(study.study_name)
"""


def test_processes_creating_one_study_at_once_all_open_it(tmp_path):
    # a worker, `llmpareto front` or a notebook may open a run's study.db while it is created
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN, str(tmp_path), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "race", err[-2000:]
    assert len(optuna.get_all_study_names(f"sqlite:///{tmp_path / 'race' / 'study.db'}")) == 1
