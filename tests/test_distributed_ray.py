"""Ray backend on a real two-node cluster on loopback (each node its own `ray start`, token
authentication on): trials on both nodes, a worker node killed mid-run, a killed driver."""

from __future__ import annotations

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
from llmpareto.tests.clusters import RayCluster, free_port, serve


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from serve(lambda: RayCluster(tmp_path_factory.mktemp("ray")))


def _search(cluster: RayCluster, settings: dict, *extra: str,
            cwd: Path | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "llmpareto.cli", "search", "--backend", "ray", "--address",
            cluster.address, "--cpus-per-trial", "1", "--max-concurrent", "2", "--no-progress",
            *extra]
    for k, v in settings.items():
        if k != "progress":
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(argv, env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def _check_run(run: Path, study: str, trials: int) -> pd.DataFrame:
    s = optuna.load_study(study_name=study, storage=f"sqlite:///{run / 'study.db'}")
    done = s.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == trials
    assert s.metric_names == ["perplexity", "memory_bytes"]  # optuna-dashboard's axis names
    labels = [t.user_attrs["baseline"] for t in done if t.user_attrs.get("baseline")]
    assert len(labels) == 7 and len(set(labels)) == 7  # each baseline exactly once
    df = pd.read_csv(run / "trials.csv")
    assert df["trial"].is_unique and len(df) == len(s.trials)
    assert {"node", "node_ip", "perplexity", "memory_bytes", "recipe"} <= set(df.columns)
    assert (run / "front.csv").is_file() and (run / "front.png").is_file()
    # recorded by each trial's worker from its model's weights
    done = df[df["state"] == "COMPLETE"]
    assert set(done["torch_device"]) == {"cpu"} and set(done["torch_dtype"]) == {"float32"}
    return df


def test_two_nodes_then_a_worker_node_dies(cluster, tiny_settings, tmp_path, study_watch):
    worker = cluster.add_worker()
    cluster.wait_nodes(2)
    s = {**tiny_settings, "trials": 14, "eval_tokens": 2048, "dequant_cache": "100MB"}
    proc = _search(cluster, {**s, "study": "both"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    done = _check_run(tmp_path / "runs" / "both", "both", 14)
    done = done[done["state"] == "COMPLETE"]
    # Ray reports a loopback node by this machine's own address: one machine, two nodes
    assert done["node"].nunique() == 2 and done["node_ip"].nunique() == 1

    db = tmp_path / "runs" / "dies" / "study.db"
    proc = _search(cluster, {**s, "study": "dies", "trials": 40})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        nodes = {t.user_attrs.get("node") for t in study_watch.complete(db, "dies")}
        if len(nodes) == 2:  # both nodes have finished trials: kill one mid-run
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.fail(f"the search ended (exit {proc.returncode}) before the kill: "
                    f"{proc.communicate()[1][-3000:]}")
    RayCluster.kill(worker)
    n_at_kill = len(study_watch.complete(db, "dies"))
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert n_at_kill < 40
    trials = _check_run(tmp_path / "runs" / "dies", "dies", 40)
    # the trial cut off on the dead node was retried by Tune, not dropped: nothing failed
    assert (trials["state"] == "COMPLETE").all()
    assert trials["node"].nunique() == 2  # trials ran on the dead node before it died


def test_recovery_runs_as_ray_tasks_and_the_driver_writes_it(cluster, tiny_settings,
                                                             tmp_path):
    """--recover-steps on the Ray backend: each point is recovered in a Ray worker process
    (its pid is not the driver's, its node is a cluster node), and the driver records the
    columns and writes the weights of the points that gained."""
    s = {**tiny_settings, "study": "rec", "trials": 6, "formats": "f16,q5_0,q4_0",
         "recover_steps": 15, "recover_rounds": 1, "recover_tokens": 1024}
    proc = _search(cluster, s, "--cpus-per-trial", "0.5")  # two trials at once on a node
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "runs" / "rec"
    df = pd.read_csv(run / "trials.csv")
    # each worker planned its caches on half its node's memory (ray_backend.node_share)
    on_ray = df[df["node"].notna() & (df["state"] == "COMPLETE")]
    assert len(on_ray) and set(on_ray["memory_share"]) == {0.5}, on_ray.get("memory_share")
    tried = df[df["recover_method"].notna() & (df["recover_method"] != "none")]
    assert len(tried) >= 1
    assert (tried["recover_pid"] != proc.pid).all() and tried["recover_pid"].notna().all()
    assert set(tried["recover_node"]) <= set(df["node"].dropna())  # nodes trials ran on
    kept = tried[tried["recover_used"].astype(bool)]
    assert len(kept) >= 1, tried[["recover_method", "recover_holdout_kl_nats"]]
    for t in kept["trial"]:
        assert (run / "recover" / f"trial-{int(t)}.safetensors").is_file()
    assert (kept["recovered_kl_nats"] < kept["kl_nats"]).all()


def test_killed_driver_resumes_without_loss_or_duplicates(cluster, tiny_settings, tmp_path,
                                                          study_watch):
    # the evolutionary strategy: its sampler (and its KL screens) lives in the driver
    s = {**tiny_settings, "study": "drv", "trials": 24, "eval_tokens": 2048,
         "strategy": "evolve"}
    db = tmp_path / "runs" / "drv" / "study.db"
    proc = _search(cluster, s)
    before = study_watch.kill_when_complete(proc, db, "drv", 8, timeout_s=240, poll_s=0.1)
    assert 8 <= len(before) < 24, "the kill should land mid-run"
    proc = _search(cluster, s, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    _check_run(tmp_path / "runs" / "drv", "drv", 24)
    after = {t.number: (t.values, t.params) for t in study_watch.complete(db, "drv")}
    assert all(after[n] == v for n, v in before.items())  # nothing lost or rewritten


def test_a_driver_without_the_token_is_told_how_to_get_it(cluster, tiny_settings, tmp_path):
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    argv = [sys.executable, "-m", "llmpareto.cli", "search", "--backend", "ray", "--address",
            cluster.address, "--model", tiny_settings["model"], "--runs-dir", str(tmp_path)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 2 and "RAY_AUTH_TOKEN" in out.stderr, out.stderr[-2000:]


def test_unreachable_address_fails_fast_with_the_address(tiny_settings):
    port = free_port()
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
        llmpareto.search(backend="ray", address=f"127.0.0.1:{port}", **tiny_settings)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(UserError, match="HOST:PORT"):
        llmpareto.search(backend="ray", address="nowhere", **tiny_settings)


def test_a_driver_with_another_ray_is_refused_with_both_versions(cluster, tiny_settings):
    """Ray's own check on the real cluster, the driver (the real CLI, in its own process)
    claiming another ray version: a second ray install cannot share this environment."""
    import ray

    argv = ["search", "--backend", "ray", "--address", cluster.address, "--no-progress",
            "--model", tiny_settings["model"], "--runs-dir", tiny_settings["runs_dir"]]
    code = ("import sys, ray._private.utils as u; real = u.compute_version_info(); "
            "u.compute_version_info = lambda: ('2.0.0', real[1]); "
            f"from llmpareto.cli import main; sys.exit(main({argv!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True,
                         text=True, timeout=180, check=False)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("llmpareto: error:")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert f"runs ray {ray.__version__}" in lines[0] and "ray 2.0.0" in lines[0], lines[0]
    assert "Traceback" not in out.stderr


def test_a_node_with_another_llmpareto_is_refused_before_any_trial(cluster, tiny_settings,
                                                                   tmp_path):
    """A worker node whose Python finds llmpareto 9.9.9's metadata first (as a node with
    another release installed would): one error line naming both versions, no trial sent."""
    from llmpareto.versions import package_versions

    fake = tmp_path / "site" / "llmpareto-9.9.9.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: llmpareto\nVersion: 9.9.9\n")
    alive = cluster.alive_nodes()
    node = cluster.add_worker(env={"PYTHONPATH": str(fake.parent)})
    try:
        cluster.wait_nodes(alive + 1)
        # from another folder: Ray puts the driver's working folder first on every worker's
        # path, and a source checkout's llmpareto.egg-info would be found before the node's
        proc = _search(cluster, {**tiny_settings, "study": "ver"}, cwd=tmp_path)
        _, err = proc.communicate(timeout=300)
    finally:
        RayCluster.kill(node)
    lines = [ln for ln in err.splitlines() if ln.startswith("llmpareto: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    mine = package_versions(("llmpareto",))["llmpareto"]
    assert "llmpareto 9.9.9" in lines[0] and f"llmpareto {mine}" in lines[0], lines[0]
    db = tmp_path / "runs" / "ver" / "study.db"
    assert not db.exists() or not optuna.load_study(
        study_name="ver", storage=f"sqlite:///{db}").trials
