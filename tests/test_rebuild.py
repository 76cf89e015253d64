"""study.db is the source of truth: `front --rebuild` writes the run's files again from it, a
distillation result lives in the study too, and every output is written atomically."""

import json
import os

import pandas as pd
import pytest

import llmpareto
from llmpareto import atomic
from llmpareto.cli import main
from llmpareto.errors import UserError
from llmpareto.search.settings import SearchSettings


@pytest.fixture
def run(tiny_settings, tmp_path):
    s = {**tiny_settings, "study": "rb", "trials": 9}
    llmpareto.search(**s)
    return tmp_path / "runs" / "rb", s


def _read(run):
    return {name: (run / name).read_bytes() for name in ("trials.csv", "front.csv", "front.json")}


def test_rebuild_writes_the_same_files_from_the_study(run, capsys):
    path, _ = run
    before = _read(path)
    recipes = {p.name: p.read_text() for p in (path / "recipes").glob("*.json")}
    (path / "trials.csv").write_text("trial,sta")  # half-written
    (path / "front.json").unlink()
    (path / "front.png").write_bytes(b"\x89PNG")
    first, second = sorted(recipes)[:2]
    (path / "recipes" / first).write_text('{"modules": {"x"')
    (path / "recipes" / second).unlink()
    assert main(["front", str(path), "--rebuild", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "rebuilt" in out and "2 recipe file(s)" in out
    assert _read(path) == before
    assert {p.name: p.read_text() for p in (path / "recipes").glob("*.json")} == recipes
    png = (path / "front.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"IEND" in png[-16:]


def test_distilled_columns_survive_a_rebuild(run, tmp_path):
    from llmpareto.search.distill_run import record

    path, _ = run
    trial = int(pd.read_csv(path / "front.csv")["trial"].iloc[0])
    from llmpareto.rundir import RunDir

    record(RunDir(path), trial, {"distilled_perplexity": 12.5, "distill_steps": 3})
    assert main(["front", str(path), "--rebuild"]) == 0
    for name in ("trials.csv", "front.csv"):
        df = pd.read_csv(path / name)
        got = df.loc[df["trial"] == trial, "distilled_perplexity"]
        assert got.tolist() == [12.5], name


def test_resume_of_a_run_killed_before_its_study_existed(tiny_settings, tmp_path):
    """The first file on disk is run.json: a run killed during its model load resumes."""
    s = {**tiny_settings, "study": "early", "trials": 8}
    path = tmp_path / "runs" / "early"
    path.mkdir(parents=True)
    settings = SearchSettings(**{**s, "progress": False})
    (path / "run.json").write_text(json.dumps({"settings": settings.to_dict(),
                                               "status": "starting"}))
    front = llmpareto.search(**{**s, "resume": True})
    trials = pd.read_csv(path / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() == 8 and len(front.df) >= 1
    labels = trials["baseline"].dropna()
    assert labels.is_unique and len(labels) == 7  # the baselines, enqueued once


@pytest.mark.parametrize("bad, msg", [
    (lambda p: (p / "study.db").unlink(), "no study.db"),
    (lambda p: (p / "study.db").write_bytes(b"not a database at all" * 10), "not an SQLite"),
    (lambda p: (p / "run.json").unlink(), "no run.json"),
])
def test_rebuild_bad_run_dir(run, bad, msg, capsys):
    path, _ = run
    bad(path)
    assert main(["front", str(path), "--rebuild"]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_a_write_failure_is_a_user_error_and_keeps_the_old_file(tmp_path):
    import resource

    target = tmp_path / "big.txt"
    target.write_text("old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(UserError, match="cannot write .*big.txt"):
            atomic.write_text(target, "x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["big.txt"]


def test_remove_stale_keeps_a_live_writers_temporaries(tmp_path, dead_pid):

    dead = dead_pid
    (tmp_path / f".trials.csv.{dead}.abc123.tmp").write_text("x")
    (tmp_path / f".front.csv.{os.getpid()}.abc123.tmp").write_text("x")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / f".3.json.{dead}.zz.tmp").write_text("x")
    removed = atomic.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".trials.csv.{dead}.abc123.tmp",
                                                      f".3.json.{dead}.zz.tmp"])
    assert (tmp_path / f".front.csv.{os.getpid()}.abc123.tmp").exists()


def test_remove_stale_for_a_target_touches_only_that_names_temporaries(tmp_path, dead_pid):
    """An export folder sits among the user's files: only `.<out>.<dead pid>.*.tmp` go."""

    dead = dead_pid
    mine = tmp_path / f".x[1].{dead}.abc.tmp"
    mine.mkdir()
    (mine / "model.gguf").write_bytes(b"half")
    other = tmp_path / f".y.{dead}.abc.tmp"
    other.write_text("someone else's")
    live = tmp_path / f".x[1].{os.getpid()}.abc.tmp"
    live.mkdir()
    removed = atomic.remove_stale(tmp_path, target="x[1]")
    assert removed == [mine] and not mine.exists()
    assert other.exists() and live.exists()
