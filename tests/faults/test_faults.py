"""Fault injection (issue 15): the real CLI killed at random moments, out of disk, fed damaged
files. Default: a short run (3 local kill points, pick, distill, 1 disk-full, the damaged
inputs, 1 RDB worker kill, 1 Ray worker-node kill). LLMPARETO_FAULTS=full: 20 local kill
points over every phase, 5 RDB worker kills, 5 Ray node kills, 3 disk-full sizes.

The random moments come from one seed, printed at the start (LLMPARETO_FAULTS_SEED=S to
repeat a run): a fixed one in the short run inside the test command, so CI draws the same kill
points every time; a new one per full run. Every test prints its counts (pytest -s)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from llmpareto.tests.clusters import serve
from llmpareto.tests.faults import harness as h

pytestmark = pytest.mark.faults

FULL = os.environ.get("LLMPARETO_FAULTS", "") == "full"
SHORT_SEED = 2026  # the short run's draw (also bench_faults' in the closing note of issue 15)
SEED = int(os.environ.get("LLMPARETO_FAULTS_SEED",
                          str(int(time.time()) % 100_000 if FULL else SHORT_SEED)))
TRIALS = 10
print(f"\n[faults] seed {SEED} (LLMPARETO_FAULTS_SEED={SEED} repeats it); "
      f"mode {'full' if FULL else 'short'}", flush=True)


def rng_for(name: str) -> random.Random:
    return random.Random(SEED * 1_000_003 + zlib.crc32(name.encode()))


def assert_clean(outcomes: list[h.Outcome]) -> None:
    for o in outcomes:
        print(o.line())
    print(h.table(outcomes))
    bad = [o.line() for o in outcomes if not o.ok]
    assert not bad, "\n".join(bad)


def local_chains() -> list[list[str]]:
    """Kill points for one search each: phases in run order; outputs/end only last."""
    rng = rng_for("chains")
    if not FULL:  # 3 different phases, one of them a finishing one
        early = sorted(rng.sample(["load", "prepare", "trial"], 2), key=h.PHASES.index)
        return [[*early, rng.choice(["outputs", "end"])]]
    # 4 searches x 5 kills = 20: load, prepare and 2 trials each, then outputs or end
    return [["load", "prepare", "trial", "trial", last]
            for last in ("outputs", "end", "outputs", "end")]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return h.tiny_model(tmp_path_factory.mktemp("faults-model") / "model")


@pytest.fixture(scope="module")
def killed_runs(model, tmp_path_factory) -> tuple[list[h.Outcome], dict]:
    """The local kill chains; returns their outcomes and the settings of the first run (a
    finished run directory that later tests copy)."""
    runs = tmp_path_factory.mktemp("faults-runs")
    outcomes, first = [], None
    for i, phases in enumerate(local_chains()):
        rng = rng_for(f"chain{i}")
        h.log(f"chain {i}: {phases}")
        seed = rng.randint(0, 10_000)
        outcomes += h.kill_chain(phases, model, runs, f"k{i}", rng, trials=TRIALS,
                                 settings={"seed": seed})
        if first is None:
            first = h.search_settings(model, runs, f"k{i}", rng, TRIALS, {"seed": seed})
    return outcomes, first


def copy_run(killed_runs, dst: Path) -> tuple[Path, dict]:
    """A copy of the first finished run, and the settings that resume it."""
    _, first = killed_runs
    shutil.copytree(Path(first["runs_dir"]) / first["study"], dst / "runs" / first["study"])
    return dst / "runs" / first["study"], {**first, "runs_dir": str(dst / "runs")}


def test_local_search_killed_at_random_moments_resumes_whole(killed_runs):
    outcomes, _ = killed_runs
    assert len(outcomes) == (20 if FULL else 3)
    assert_clean(outcomes)  # each kill landed on a live search (Outcome.ok)
    assert all(o.injected for o in outcomes)


def test_a_fault_that_never_landed_fails_the_suite(model, tmp_path):
    """A no-op fault (the search 'killed' after it had exited) is not a survived fault."""
    outcomes = h.kill_chain(["exited"], model, tmp_path / "runs", "noop", rng_for("noop"),
                            trials=TRIALS, attempts=1)
    assert [o.injected for o in outcomes] == [False]
    with pytest.raises(AssertionError, match="never landed"):
        assert_clean(outcomes)


def test_leftover_temporaries_fail_an_outcome():
    o = h.Outcome("x", injected=True, completed=True)
    assert o.ok
    o.leftover_tmp.append("runs/t/.trials.csv.123.abc.tmp")
    assert not o.ok


def test_outputs_keep_the_permissions_the_umask_gives(killed_runs):
    _, first = killed_runs
    bad = h.permission_problems(Path(first["runs_dir"]) / first["study"])
    print(f"files with other permissions than the umask gives: {bad}")
    assert not bad


@pytest.fixture(scope="module")
def picked(killed_runs, tmp_path_factory) -> tuple[h.Outcome, Path]:
    work = tmp_path_factory.mktemp("faults-pick")
    run, _ = copy_run(killed_runs, work)
    o = h.kill_pick(run, work / "out", rng_for("pick"))
    return o, work / "out"


def test_pick_killed_then_rerun_leaves_a_whole_export(picked):
    o, out = picked
    assert_clean([o])
    assert h.export_complete(out) is None


def test_distill_killed_resumes_from_its_checkpoint(killed_runs, tmp_path):
    run, _ = copy_run(killed_runs, tmp_path)
    o = h.kill_distill(run, rng_for("distill"))
    assert_clean([o])
    assert "had finished" in o.detail or "resumed at" in o.detail




@pytest.mark.parametrize("kind", ["truncated", "flipped"])
def test_damaged_study_db_is_refused_and_left_alone(killed_runs, tmp_path, kind):
    _, s = copy_run(killed_runs, tmp_path)
    o = h.damage_study_db(s, kind, rng_for(f"db-{kind}"))
    assert_clean([o])


@pytest.mark.parametrize("kind", ["truncated", "tensor-count", "huge-shape"])
def test_damaged_gguf_model_is_refused(picked, tmp_path, kind):
    _, out = picked
    bad = tmp_path / f"{kind}.gguf"
    what = h.damage_gguf(out / "model.gguf", bad, kind)
    s = h.search_settings(bad, tmp_path / "runs", "g", rng_for(kind), 4)
    o = h.refuse(f"damaged GGUF ({kind})", what, h.search_argv(s), must_name=str(bad))
    assert_clean([o])
    assert not (tmp_path / "runs" / "g" / "study.db").exists()


@pytest.mark.parametrize("name", list(h.BAD_RECIPES))
def test_bad_recipe_json_is_refused(model, tmp_path, name):
    o = h.bad_recipe(model, tmp_path, name)
    assert_clean([o])


@pytest.mark.parametrize("key", list(h.WRONG_UNITS))
def test_device_profile_with_wrong_units_is_refused(tmp_path, key):
    p = h.wrong_units_profile(tmp_path, key)
    o = h.refuse(f"device profile wrong units: {key}", f"{key} = {h.WRONG_UNITS[key][0]}",
                 [*h.CLI, "devices", str(p)], must_name=key)
    assert_clean([o])


with tempfile.TemporaryDirectory(prefix="faults-probe-") as _probe:
    DISK_MODE = "tmpfs" if h.tmpfs_works(Path(_probe)) else "rlimit"


def disk_sizes() -> list:
    rng = rng_for("disk")
    out = []
    for band, (lo, hi) in enumerate(h.DISK_BANDS[DISK_MODE]):
        if not FULL and band != 1:  # the short run: one size in the middle band
            continue
        size = rng.randint(lo, hi) * 1024
        # early: while the study is created; middle: during enqueue/trials (optuna's writes);
        # late: wherever it lands (optuna's writes or llmpareto's atomic files)
        out.append(pytest.param(size, id=f"{size // 1024}KiB"))
    return out


@pytest.mark.parametrize("size", disk_sizes())
def test_full_disk_stops_clearly_and_resumes(model, tmp_path, size):
    print(f"disk full by {DISK_MODE}")
    o = h.disk_full(model, tmp_path, "d", size, rng_for(f"disk{size}"), mode=DISK_MODE,
                    trials=TRIALS)
    assert_clean([o])


@pytest.fixture(scope="module")
def pg():
    yield from serve(h.PgServer)


@pytest.mark.parametrize("i", range(5 if FULL else 1))
def test_rdb_worker_killed_another_worker_finishes(pg, model, tmp_path, i):
    o = h.kill_rdb_worker(pg, model, tmp_path, f"rdb{i}", rng_for(f"rdb{i}"), trials=TRIALS)
    assert_clean([o])


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    yield from serve(lambda: h.RayCluster(tmp_path_factory.mktemp("faults-ray")))


@pytest.mark.parametrize("i", range(5 if FULL else 1))
def test_ray_worker_node_killed_search_finishes(ray_cluster, model, tmp_path, i):
    o = h.kill_ray_node(ray_cluster, model, tmp_path / "runs", f"ray{i}", rng_for(f"ray{i}"))
    assert_clean([o])
