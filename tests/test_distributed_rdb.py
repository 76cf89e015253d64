"""Shared-RDB search: a real PostgreSQL server (from the package manager), two `llmpareto worker`
processes on one study, every trial exactly once; bad URLs and studies fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import llmpareto
from llmpareto.errors import UserError
from llmpareto.search.rdb import connect
from llmpareto.tests.clusters import PgServer, free_port, serve


@pytest.fixture(scope="module")
def pg_url():
    """A throwaway server on 127.0.0.1 and a free port, data in a temp dir, stopped after."""
    for server in serve(PgServer):
        yield server.new_db("llmpareto")


def _worker(study: str, url: str, runs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmpareto.cli", "worker", "--study", study,
                             "--storage", url, "--runs-dir", str(runs), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_one_study_every_trial_once(pg_url, tiny_settings, tmp_path):
    # evolve: each worker reads the sensitivity profile the creator stored in the study
    s = {**tiny_settings, "study": "shared", "trials": 24, "eval_tokens": 2048,
         "strategy": "evolve"}
    llmpareto.search(storage=pg_url, create_only=True, **s)
    procs = [_worker("shared", pg_url, tmp_path / f"w{i}") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]

    study = optuna.load_study(study_name="shared", storage=connect(pg_url))
    assert study.metric_names == ["perplexity", "memory_bytes"]
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) >= 24 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.number for t in done}) == len(done)
    labels = [t.user_attrs["baseline"] for t in done if t.user_attrs.get("baseline")]
    assert len(labels) == 7 and len(set(labels)) == 7  # each baseline exactly once
    seeds = [t.user_attrs["seed"] for t in done if t.user_attrs.get("seed")]
    assert seeds and len(seeds) == len(set(seeds))  # each knapsack seed exactly once
    profile = study.user_attrs["llmpareto_sensitivity"]  # measured once, by the creator
    for i in range(2):
        mine = json.loads((tmp_path / f"w{i}" / "shared" / "sensitivity.json").read_text())
        assert mine == profile
    here = [int(o[0].split("worker finished: ")[1].split()[0]) for o in outs]
    assert sum(here) == len(done) and min(here) >= 1, here  # both worked, none twice
    assert len({t.user_attrs["node"] for t in done}) == 2
    for i in range(2):  # each worker leaves the whole run directory behind
        trials = pd.read_csv(tmp_path / f"w{i}" / "shared" / "trials.csv")
        assert trials["trial"].is_unique and len(trials) == len(study.trials)
        assert {"node", "node_ip", "memory_bytes", "perplexity"} <= set(trials.columns)
        assert (tmp_path / f"w{i}" / "shared" / "front.csv").is_file()
        assert len(list((tmp_path / f"w{i}" / "shared" / "recipes").glob("*.json"))) == len(done)


def test_bad_storage_and_studies_fail_clearly(pg_url, tiny_settings, tmp_path):
    dead = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x"
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="127.0.0.1") as err:
        llmpareto.search(storage=dead, **tiny_settings)
    assert time.perf_counter() - t0 < 15 and "secret" not in str(err.value)
    with pytest.raises(UserError, match="not a SQLAlchemy URL"):
        llmpareto.search(storage="no-such-scheme", **tiny_settings)

    proc = _worker("nobody", pg_url, tmp_path)
    _, err_text = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no study 'nobody'" in err_text, err_text

    s = {**tiny_settings, "study": "space", "trials": 2}
    llmpareto.search(storage=pg_url, create_only=True, **s)
    with pytest.raises(UserError, match="formats"):  # made with another space
        llmpareto.search(storage=pg_url, resume=True, **{**s, "formats": "q8_0,q4_0"})
    with pytest.raises(UserError, match="already exists"):
        llmpareto.search(storage=pg_url, **s)


def test_a_worker_killed_inside_ask_leaves_no_trial_running_forever(pg_url, tiny_settings,
                                                                    tmp_path):
    """A trial created by ask() whose worker died before any heartbeat (optuna never marks it
    stale) is failed after GRACE_S by the next worker, which then finishes the study; a
    worker's own trials carry their first heartbeat from inside ask()."""
    s = {**tiny_settings, "study": "orphan", "trials": 8}
    llmpareto.search(storage=pg_url, create_only=True, **s)
    study = optuna.load_study(study_name="orphan", storage=connect(pg_url))
    orphan = study.ask()  # a baseline popped from the queue, then "killed": no heartbeat
    label = orphan.user_attrs.get("baseline")
    proc = _worker("orphan", pg_url, tmp_path / "w")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="orphan", storage=connect(pg_url))
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.trials)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) >= 8
    assert all(t.system_attrs.get("llmpareto:heartbeat_from_ask") for t in done)
    labels = [t.user_attrs.get("baseline") for t in done]
    assert label and labels.count(label) == 1  # the cut-off baseline ran once, requeued
