"""Shared-RDB search: a real PostgreSQL server (from the package manager), two `llmpareto worker`
processes on one study, every trial exactly once; bad URLs and studies fail clearly."""

from __future__ import annotations

import json
import socket
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


def test_the_recovery_board_hands_each_point_to_one_process(pg_url, tiny_settings, monkeypatch):
    """The job board of a PostgreSQL study: a point is claimed by one process only, the
    weights a later round starts from reach it and its outcome (weights in parts) comes back
    intact, neither mixed with the other; a silent claim is queued again, a taken point is
    posted again only when the study lacks it."""
    import sqlalchemy as sa
    import torch

    from llmpareto.recipe import Recipe
    from llmpareto.search import rdb_recover as rr
    from llmpareto.search.recover import Job, Outcome

    monkeypatch.setattr(rr, "PART_BYTES", 1000)  # several parts for a small file
    study = optuna.create_study(study_name="board", storage=connect(pg_url))
    boards = [rr.Board(study), rr.Board(study)]  # two processes' views
    sw = {"z": torch.randn(50, 20), "packed:z": torch.arange(1200, dtype=torch.uint8) % 251}
    jobs = [Job(3, Recipe.uniform("q4_0"), 8, {"kl_nats": 0.5}, 1, (sw, True)),
            Job(5, Recipe.uniform("q4_0"), 8, {"kl_nats": 0.5})]
    boards[0].post(jobs)
    boards[1].post(jobs)  # posting twice queues nothing twice
    a, b = boards[0].claim(), boards[1].claim()
    assert (a.trial, b.trial) == (3, 5) and boards[0].claim() is None
    assert a.before == {"kl_nats": 0.5} and a.recipe.to_json() == jobs[0].recipe.to_json()
    assert (a.rung, b.rung, b.start) == (1, 0, None) and a.start[1] is True
    assert set(a.start[0]) == set(sw) and all(torch.equal(a.start[0][k], sw[k]) for k in sw)
    w = {"x": torch.randn(40, 30), "packed::y": torch.arange(900, dtype=torch.uint8)}
    boards[0].finish(a, Outcome({"recovered_kl_nats": 0.25}, w, {"trial": str(a.trial)}))
    (got,) = boards[1].done({(a.trial, 8), (b.trial, 8)})
    assert got[:2] == (a.trial, 8) and got[2].columns == {"recovered_kl_nats": 0.25}
    assert got[2].meta == {"trial": str(a.trial)}
    assert all(torch.equal(got[2].weights[k], w[k]) for k in w)
    with boards[0].engine.begin() as c:  # the weights took several parts
        assert c.execute(sa.select(sa.func.count()).select_from(rr.PARTS)).scalar() > 3
    boards[1].taken(a.trial, 8)
    assert list(boards[1].done({(a.trial, 8)})) == []
    assert boards[0].requeue_stale() == 0  # b's process is alive (its beat is fresh)
    with boards[0].engine.begin() as c:  # ... until it is silent for GRACE_S
        c.execute(rr.JOBS.update().where(rr.JOBS.c.trial == b.trial)
                  .values(beat=boards[0].now() - rr.GRACE_S - 1))
    assert boards[0].requeue_stale() == 1 and boards[0].claim().trial == b.trial
    boards[0].post(jobs)  # a taken point the study lacks (a killed coordinator) comes back
    again = boards[1].claim()
    assert again.trial == a.trial and all(torch.equal(again.start[0][k], sw[k]) for k in sw)


def test_recovery_is_shared_by_workers_and_survives_a_killed_one(pg_url, tiny_settings,
                                                                  tmp_path):
    """--recover-steps with a shared study and --no-recover-here: the search process hands
    every point to the `llmpareto worker`s, their weights reach its run directory through the
    database; a worker killed while it recovers a point loses nothing (the point is taken
    again). (With the search process claiming points too, a small front can be recovered
    before any worker looks: the board test covers processes sharing one round.)"""
    import sqlalchemy as sa

    from llmpareto.search import rdb_recover as rr

    s = {**tiny_settings, "study": "rshare", "trials": 10, "formats": "f16,q5_0,q4_1,q4_0",
         "recover_steps": 15, "recover_rounds": 1, "recover_tokens": 1024, "storage": pg_url,
         "runs_dir": str(tmp_path / "c")}
    llmpareto.search(create_only=True, **s)
    # the workers run the trials and wait for the search process, which recovers with them
    workers = [_worker("rshare", pg_url, tmp_path / f"w{i}") for i in range(2)]
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in s.items() if k != "progress"]
    coord = subprocess.Popen([sys.executable, "-m", "llmpareto.cli", "search", "--no-progress",
                              "--resume", "--no-recover-here", *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    engine, held = None, None
    by_pid = {w.pid: w for w in workers}
    deadline = time.monotonic() + 400
    while held is None and time.monotonic() < deadline and coord.poll() is None:
        try:  # the first worker seen recovering a point is killed
            engine = engine or connect(pg_url).engine
            with engine.connect() as c:
                row = c.execute(sa.select(rr.JOBS.c.trial, rr.JOBS.c.worker).where(
                    (rr.JOBS.c.state == rr.RUNNING) & (rr.JOBS.c.trial >= 0)
                    & rr.JOBS.c.worker.in_([f"{socket.gethostname()}:{p}" for p in by_pid]))
                ).first()
            if row is not None:
                held, victim = row.trial, by_pid[int(row.worker.rsplit(":", 1)[1])]
        except Exception:  # noqa: BLE001 - the table is not there yet
            held = None
        time.sleep(0.2)
    if held is None:
        coord.kill()
        pytest.fail(f"no worker took a point to recover: {coord.communicate()[1][-3000:]}"
                    f" {[w.communicate()[0][-2000:] for w in workers]}")
    victim.kill()
    survivor = next(w for w in workers if w is not victim)
    _, err = coord.communicate(timeout=400)
    assert coord.returncode == 0, err[-3000:]
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err[-2000:]
    assert "worker recovered" in out
    t = pd.read_csv(tmp_path / "c" / "rshare" / "trials.csv").set_index("trial")
    tried = t[t["recover_method"].notna() & (t["recover_method"] != "none")]
    assert held in tried.index and tried.loc[held, "recover_pid"] != victim.pid  # taken again
    pids = set(tried["recover_pid"].astype(int))
    assert pids <= {victim.pid, survivor.pid}, "the search process recovered a point"
    kept = tried[tried["recover_used"].astype(bool)]
    assert len(kept) >= 1
    for trial in kept.index:  # weights recovered anywhere are in the search's run directory
        assert (tmp_path / "c" / "rshare" / "recover" / f"trial-{trial}.safetensors").is_file()
    assert (kept["recovered_kl_nats"] < kept["kl_nats"]).all()
    sid = optuna.load_study(study_name="rshare", storage=connect(pg_url))._study_id
    with engine.connect() as c:  # nothing left on the board: taken or over
        states = set(c.execute(sa.select(rr.JOBS.c.state).where(
            rr.JOBS.c.study_id == sid)).scalars())
        assert states <= {rr.TAKEN, rr.OVER}, states
        assert c.execute(sa.select(sa.func.count()).select_from(rr.PARTS).where(
            rr.PARTS.c.study_id == sid)).scalar() == 0
