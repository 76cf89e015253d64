"""Fault-suite distributed kills: an `llmpareto worker` on a shared PostgreSQL study and a
Ray worker node, SIGKILLed mid-search; the servers come from llmpareto.tests.clusters."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

from llmpareto.tests.clusters import PgServer, RayCluster, Unavailable
from llmpareto.tests.faults.checks import (
    Outcome,
    account,
    check_run_dir,
    complete_trials,
    log,
    n_complete_fast,
)
from llmpareto.tests.faults.kills import (
    ATTEMPTS,
    CLI,
    EARLIER,
    FAST,
    N_BASELINES,
    missed,
    run_cli,
    search_argv,
    sigkill,
)

# a fault that cannot be injected here (no Ray, no PostgreSQL): the reason says why
SkipFault = Unavailable


def kill_rdb_worker(pg: PgServer, model: Path, work: Path, study: str, rng: random.Random,
                    trials: int = 10, timeout: float = 400,
                    attempts: int = ATTEMPTS) -> Outcome:
    """Create a shared study, start `llmpareto worker`, SIGKILL it at a random moment while it
    runs (while it loads, or after k complete trials; a worker that had finished first is tried
    again on a new database, earlier), then run another worker to completion."""
    t0 = time.time()
    scale = 1.0
    for attempt in range(1, attempts + 1):
        url = pg.new_db()
        s = {"model": str(model), "runs_dir": str(work / f"{study}-creator"), "study": study,
             "trials": trials, "seed": rng.randint(0, 10_000), **FAST}
        shutil.rmtree(work / f"{study}-creator", ignore_errors=True)
        res = run_cli(search_argv(s, "--storage", url, "--create-only"), timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"--create-only failed: {res.stderr[-1500:]}")

        def worker(i: int, url: str = url) -> list[str]:
            return [*CLI, "worker", "--study", study, "--storage", url, "--runs-dir",
                    str(work / f"{study}-w{i}"), "--no-progress"]

        shutil.rmtree(work / f"{study}-w1", ignore_errors=True)
        start = time.time()
        proc = subprocess.Popen(worker(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if rng.random() < 0.25:
            d = rng.uniform(0.5, 6.0) * scale
            while proc.poll() is None and time.time() - start < d:
                time.sleep(0.01)
            aim = f"{d:.1f}s after start"
        else:
            k = max(1, int(rng.randint(1, trials - 1) * scale))
            d = rng.uniform(0.0, 0.3) * scale
            while proc.poll() is None and len(complete_trials(url, study)) < k \
                    and time.time() - t0 < timeout:
                time.sleep(0.1)
            time.sleep(d)
            aim = f"{d:.2f}s after {k} complete"
        killed = sigkill(proc)
        if killed or attempt == attempts:
            break
        scale *= EARLIER
    before = complete_trials(url, study)
    o = Outcome("SIGKILL RDB worker", f"{aim}; {len(before)} complete at the kill"
                + (f"; try {attempt}" if attempt > 1 else ""), injected=killed)
    if not killed:
        missed(o, attempt, f"the worker had exited with {proc.returncode}")
    res = run_cli(worker(2), timeout=timeout)
    o.completed = res.returncode == 0
    if not o.completed:
        o.problems.append(f"second worker exit {res.returncode}: {res.stderr[-800:]}")
    if "Traceback" in res.stderr:
        o.problems.append("traceback in the second worker's stderr")
    run2 = work / f"{study}-w2" / study
    acc = account(url, study, before, run2 / "trials.csv", trials)
    o.lost, o.duplicated = acc["lost"], acc["duplicated"]
    if acc["complete"] < trials:
        o.problems.append(f"{acc['complete']} complete, wanted {trials}")
    if acc["csv_problem"]:
        o.problems.append(acc["csv_problem"])
    if acc["baselines"] != N_BASELINES:
        o.problems.append(f"{acc['baselines']} baselines complete, wanted {N_BASELINES}")
    chk = [check_run_dir(work / f"{study}-w{i}" / study) for i in (1, 2)]
    o.half_written = chk[0]["half_written"] + chk[1]["half_written"]
    o.leftover_tmp = chk[1]["leftover_tmp"]
    o.seconds = time.time() - t0
    log(o.line())
    return o


def kill_ray_node(cluster: RayCluster, model: Path, runs: Path, study: str,
                  rng: random.Random, trials: int = 14, timeout: float = 500,
                  attempts: int = ATTEMPTS) -> Outcome:
    """A Ray search on a head + worker node; the worker node's process group (raylet and its
    workers) SIGKILLed after k complete trials (random k) while the search runs (a search that
    had finished first is started again as a new study, the kill aimed earlier); the search
    must finish (or finish with --resume); 0 lost, 0 duplicated, 0 half-written. A fresh worker
    node is started for the next round."""
    t0 = time.time()
    extra = ("--backend", "ray", "--address", cluster.address, "--cpus-per-trial", "1",
             "--max-concurrent", "2")
    scale = 1.0
    for attempt in range(1, attempts + 1):
        if not any(p.poll() is None for p in cluster.workers):
            cluster.add_worker()
            cluster.wait_nodes(2)
        worker = next(p for p in cluster.workers if p.poll() is None)
        name = study if attempt == 1 else f"{study}-{attempt}"
        s = {"model": str(model), "runs_dir": str(runs), "study": name, "trials": trials,
             "seed": rng.randint(0, 10_000), **FAST, "eval_tokens": 1024,
             "dequant_cache": "100MB"}
        run, db = runs / name, runs / name / "study.db"
        proc = subprocess.Popen(search_argv(s, *extra), env=cluster.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        k = max(1, int(rng.randint(1, trials - 2) * scale))
        d = rng.uniform(0.0, 1.0) * scale
        while proc.poll() is None and n_complete_fast(db) < k and time.time() - t0 < timeout:
            time.sleep(0.05)
        time.sleep(d)
        # the fault is the node's death while the search runs: both must be alive here
        mid_run = (proc.poll() is None and worker.poll() is None
                   and 0 <= n_complete_fast(db) < trials)
        RayCluster.kill(worker)
        before = complete_trials(db, study=name)
        if mid_run or attempt == attempts:
            break
        proc.communicate(timeout=timeout)
        scale *= EARLIER
    o = Outcome("SIGKILL Ray worker node", f"{d:.2f}s after {k} complete; "
                f"{len(before)} complete at the kill"
                + (f"; try {attempt}" if attempt > 1 else ""), injected=mid_run)
    if not mid_run:
        missed(o, attempt, "the search or the node had exited before the kill")
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        sigkill(proc)
        err = b"(timed out)"
    err = err.decode(errors="replace")
    if proc.returncode != 0:
        o.detail += f"; search exit {proc.returncode}, resumed"
        res = run_cli(search_argv(s, *extra, "--resume"), env=cluster.env, timeout=timeout)
        o.completed = res.returncode == 0
        if not o.completed:
            o.problems.append(f"resume exit {res.returncode}: {res.stderr[-800:]}")
    else:
        o.completed = True
        o.detail += "; finished without resume"
    if "Traceback" in err and proc.returncode != 0:
        o.problems.append(f"traceback from the search: {err[-500:]}")
    acc = account(db, name, before, run / "trials.csv", trials)
    o.lost, o.duplicated = acc["lost"], acc["duplicated"]
    if acc["complete"] != trials:
        o.problems.append(f"{acc['complete']} complete, wanted {trials}")
    if acc["csv_problem"]:
        o.problems.append(acc["csv_problem"])
    chk = check_run_dir(run)
    o.half_written, o.leftover_tmp = chk["half_written"], chk["leftover_tmp"]
    o.seconds = time.time() - t0
    log(o.line())
    return o
