"""The printed front's quality floor, and the Python API: one function per command, its keyword
names the command's flags."""

from __future__ import annotations

import argparse
import inspect
import json

import pandas as pd
import pytest

import llmpareto
from llmpareto import api
from llmpareto.cli import main
from llmpareto.cli.main import build_parser
from llmpareto.front import QUALITY_FLOOR, Front

OBJ = ["perplexity", "memory_bytes"]


def _trials(with_base: bool = True) -> pd.DataFrame:
    rows = [  # (baseline, perplexity, memory): every one is on the front
        ("uniform f16" if with_base else "", 20.0, 270e6),
        ("uniform q8_0", 20.1, 150e6),
        ("", 25.0, 110e6),
        ("uniform q4_0", 39.9, 90e6),
        ("", 41.0, 80e6),
        ("uniform tq2_0", 1.3e7, 50e6),
    ]
    return pd.DataFrame({"trial": range(len(rows)), "state": "COMPLETE", "feasible": True,
                         "baseline": [r[0] for r in rows],
                         "perplexity": [r[1] for r in rows],
                         "memory_bytes": [r[2] for r in rows]})


def test_the_floor_hides_points_above_twice_the_base_perplexity():
    front = Front.from_trials(_trials(), OBJ)
    assert len(front) == 6
    shown, hidden, limit = front.deployable()
    assert limit == pytest.approx(QUALITY_FLOOR * 20.0, rel=1e-12)
    assert hidden == 2
    assert sorted(shown.df["trial"]) == [0, 1, 2, 3]
    assert len(front) == 6  # the front itself keeps every point


def test_without_a_uniform_f16_the_floor_is_the_runs_best_perplexity():
    front = Front.from_trials(_trials(with_base=False), OBJ)
    assert front.reference_perplexity() == pytest.approx(20.0, rel=1e-12)
    shown, hidden, _ = front.deployable(floor=1.5)  # limit 30
    assert sorted(shown.df["trial"]) == [0, 1, 2] and hidden == 3


def test_no_perplexity_means_no_floor():
    df = _trials().drop(columns="perplexity").assign(kl_nats=0.1)
    front = Front.from_trials(df, ["kl_nats", "memory_bytes"])
    shown, hidden, limit = front.deployable()
    assert (hidden, limit) == (0, None) and len(shown) == len(front)


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "r"
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"settings": {"objectives": OBJ}}))
    _trials().to_csv(path / "trials.csv", index=False)
    return path


def test_front_command_prints_the_floor_and_show_all_prints_everything(run_dir, capsys):
    assert main(["front", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "1.3e+07" not in out and "41" not in out.split("(")[0]
    assert "2 point(s) with perplexity above 40" in out and "--show-all" in out
    assert main(["front", str(run_dir), "--show-all"]) == 0
    out = capsys.readouterr().out
    assert "1.3e+07" in out and "not shown" not in out
    # machine-readable output is every point
    assert main(["front", str(run_dir), "--format", "csv"]) == 0
    assert len(pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))) == 6


def test_search_prints_the_floor(tiny_settings, capsys):
    """A search's printed front and its files: the floor never drops a row from the files."""
    assert main(["search", "--model", tiny_settings["model"], "--runs-dir",
                 tiny_settings["runs_dir"], "--study", "floor", "--window", "64",
                 "--eval-tokens", "256", "--calib-tokens", "0", "--trials", "6", "--no-progress",
                 "--formats", "f16,q4_0,tq2_0", "--presets", "none", "--quantizer", "rtn"]) == 0
    out = capsys.readouterr().out
    front = llmpareto.load_front(f"{tiny_settings['runs_dir']}/floor")
    shown, hidden, _ = front.deployable()
    table = out.split("Pareto front")[1]
    for t in front.df["trial"]:
        line_has = any(line.split()[:1] == [str(t)] for line in table.splitlines())
        assert line_has == (t in set(shown.df["trial"])), (t, out)
    assert ("not shown" in out) == (hidden > 0)
    assert len(pd.read_csv(f"{tiny_settings['runs_dir']}/floor/front.csv")) == len(front)


# The verbs: each command's flags are the keyword names of its function in llmpareto.api.
VERBS = {"front": api.load_front, "pick": api.pick, "distill": api.distill, "cost": api.cost,
         "worker": api.worker}
CLI_ONLY = {"front": {"format", "plot", "show_all", "rebuild", "storage"},  # printing, files
            "cost": {"json"}}


def _flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest for a in sub.choices[command]._actions if a.dest != "help"}


@pytest.mark.parametrize("command", sorted(VERBS))
def test_every_verb_takes_its_flags_as_keywords(command):
    params = set(inspect.signature(VERBS[command]).parameters)
    assert _flags(command) - CLI_ONLY.get(command, set()) <= params, command
    assert getattr(llmpareto, VERBS[command].__name__) is VERBS[command]


def test_search_takes_every_settings_flag():
    from dataclasses import fields

    from llmpareto.search.settings import SearchSettings

    names = {f.name for f in fields(SearchSettings)} | {"backend"}
    assert _flags("search") - {"show_all"} <= names


def test_cost_from_python_is_what_the_command_prints(capsys):
    got = llmpareto.cost(device="raspberry-pi-5", format="q4_0", context=512)
    assert main(["cost", "--device", "raspberry-pi-5", "--format", "q4_0", "--context", "512",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["totals"] == pytest.approx(got["totals"], rel=1e-12)
    assert printed["breakdown"] == got["breakdown"]
    assert got["totals"]["weights_bytes"] < llmpareto.cost(format="f16")["totals"]["weights_bytes"]


def test_python_verbs_refuse_as_the_command_does(tmp_path):
    with pytest.raises(llmpareto.UserError, match="--trial N, or --best METRIC"):
        llmpareto.pick(tmp_path, out=tmp_path / "o")
    with pytest.raises(llmpareto.UserError, match="--trial N or --front"):
        llmpareto.distill(tmp_path, steps=1)
    with pytest.raises(llmpareto.UserError, match="give --recipe or --format"):
        llmpareto.cost(recipe="r.json", format="q4_0")


def test_the_plot_leaves_out_what_the_floor_hides(tmp_path):
    from llmpareto.report import front_plot_info

    front = Front.from_trials(_trials(), OBJ)
    limit = front.deployable()[2]
    info = front_plot_info(front.trials, front.df, "memory_bytes", "perplexity", limit)
    assert sorted(info.front_xy[:, 1]) == [20.0, 20.1, 25.0, 39.9]
    assert all(y <= limit for _, _, y in info.baselines)
    every = front_plot_info(front.trials, front.df, "memory_bytes", "perplexity")
    assert len(every.front_xy) == 6
    for show_all in (False, True):
        png = tmp_path / f"{show_all}.png"
        front.plot(png, show_all=show_all)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
