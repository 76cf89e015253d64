"""Issue 15's audit: every bad input named in issues 2-15 ends in one `llmpareto: error:` line
that carries its message, exit status 2, and no Python traceback.

This file covers the bad inputs whose older tests checked the message but not the traceback,
called the API rather than the CLI, or were missing. The audit table (issue, bad input, test)
is in /work/notes/bad_input_audit.md. Everything runs on the tiny random model from conftest.

`main()` runs in this process: an exception that escapes it is what the `llmpareto` process
would print as a traceback, so `refused` fails on one. `capfd` reads file descriptor 2 too, so
a traceback printed by a library's logger would show up in `err`.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tomllib

import pytest

from llmpareto.cli import main

ERROR = re.compile(r"^llmpareto: error: .*$", re.MULTILINE)


def outcome(capfd, argv) -> tuple[int, str]:
    """`llmpareto ARGV` in this process: (exit status, stderr). Fails the test where an
    exception escapes main(), which the `llmpareto` process would print as a traceback."""
    capfd.readouterr()
    argv = [str(a) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    except Exception as exc:  # noqa: BLE001 - the process would print a traceback here
        pytest.fail(f"llmpareto {' '.join(argv)}: {type(exc).__name__}: {exc} escaped main(); "
                    "the CLI prints a Python traceback for it")
    err = capfd.readouterr().err.replace("\r", "\n")
    assert "Traceback" not in err, err[-3000:]
    return rc, err


def refused(capfd, argv, *phrases: str, code: int = 2) -> str:
    """Run `llmpareto ARGV`; assert it exits `code` with exactly one `llmpareto: error:` line
    holding every phrase, and no traceback. Returns that line."""
    rc, err = outcome(capfd, argv)
    lines = ERROR.findall(err)
    assert rc == code and len(lines) == 1, (rc, err[-3000:])
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir


def search_argv(model, runs, study, *extra):
    return ["search", "--no-progress", "--model", model, "--runs-dir", runs, "--study", study,
            "--window", "64", "--eval-tokens", "128", "--calib-tokens", "64", "--context", "512",
            "--formats", "f16,q8_0,q4_0", "--presets", "none", "--trials", "4", *extra]


# one finished run for pick, front, distill and --resume: knapsack under --max-memory 1.6MB,
# so uniform f16 (1.69 MB) is an infeasible trial and a sensitivity.json is written
RUN_FLAGS = ("--strategy", "knapsack", "--max-memory", "1.6MB")


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    runs = tmp_path_factory.mktemp("audit-runs")
    assert main([str(a) for a in search_argv(model, runs, "a", *RUN_FLAGS)]) == 0
    return runs / "a"


@pytest.fixture
def run_copy(run, tmp_path):
    """A copy of the finished run under tmp_path/runs (same study name)."""
    shutil.copytree(run, tmp_path / "runs" / run.name)
    return tmp_path / "runs" / run.name


# ---- issue 2 (foundation) --------------------------------------------------------------------

def _pickle_dir(model, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((model / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return d


def _text(tmp_path, content):
    f = tmp_path / "text.txt"
    if content is not None:
        f.write_text(content)
    return f


@pytest.mark.parametrize("case, phrases", [
    ("unknown model", ["--model 'no-such-model': no such model or path", "accepted forms",
                       "smollm2-135m", ".gguf"]),
    ("missing path", ["accepted forms"]),
    ("pickle", ["--allow-pickle", "pytorch_model.bin"]),
    ("text missing", ["--text", "no such file"]),
    ("text empty", ["--text", "is empty"]),
    ("text short", ["--text", "tokens but"]),
    ("max-memory", ["--max-memory 'lots' is not a size", "120MB", "0.5GB"]),
    ("budget below floor", ["--max-memory is below the smallest candidate", "bytes"]),
    ("study a/b", ["--study 'a/b': use letters, digits"]),
    ("study ..", ["--study '..': use letters, digits"]),
])
def test_issue2_search_input(capfd, model, tmp_path, case, phrases):
    extra = {
        "unknown model": lambda: ["--model", "no-such-model"],
        "missing path": lambda: ["--model", tmp_path / "nowhere" / "model"],
        "pickle": lambda: ["--model", _pickle_dir(model, tmp_path)],
        "text missing": lambda: ["--text", _text(tmp_path, None)],
        "text empty": lambda: ["--text", _text(tmp_path, "   \n")],
        "text short": lambda: ["--text", _text(tmp_path, "a few words only")],
        "max-memory": lambda: ["--max-memory", "lots"],
        "budget below floor": lambda: ["--max-memory", "1000"],
        "study a/b": lambda: ["--study", "a/b"],
        "study ..": lambda: ["--study", ".."],
    }[case]()
    refused(capfd, search_argv(model, tmp_path / "runs", "s", *extra), *phrases)


def test_issue2_max_memory_in_a_real_process(tmp_path):
    """The same refusal from the `llmpareto` process itself: one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "llmpareto.cli", "search", "--max-memory",
                           "12XB", "--runs-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ERROR.findall(proc.stderr) == [proc.stderr.strip()]
    assert "--max-memory '12XB'" in proc.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_issue2_damaged_study_db_is_reported_and_left_alone(capfd, model, run_copy, damage):
    db = run_copy / "study.db"
    data = db.read_bytes()
    db.write_bytes(b"this is not a database" * 100 if damage == "garbage" else
                   data[:len(data) // 2])
    before = db.read_bytes()
    refused(capfd, search_argv(model, run_copy.parent, run_copy.name, *RUN_FLAGS, "--resume"),
            "study.db cannot be opened", "Nothing was changed")
    assert db.read_bytes() == before


def test_issue2_resume_with_other_settings(capfd, model, run_copy):
    before = (run_copy / "study.db").read_bytes()
    refused(capfd, search_argv(model, run_copy.parent, run_copy.name, *RUN_FLAGS, "--resume",
                               "--granularity", "block"),
            "granularity", "was 'type'")
    assert (run_copy / "study.db").read_bytes() == before


def test_issue2_a_refused_budget_leaves_the_study_name_free(capfd, model, tmp_path):
    runs = tmp_path / "runs"
    refused(capfd, search_argv(model, runs, "b", "--max-memory", "1000"), "smallest candidate")
    rc, err = outcome(capfd, search_argv(model, runs, "b", "--max-memory", "1.6MB",
                                         "--strategy", "random", "--trials", "3"))
    assert rc == 0, ERROR.findall(err)


# ---- issue 3 (device profiles) ---------------------------------------------------------------

def _profile(tmp_path, edit) -> str:
    from llmpareto.device_profiles import profile_dir

    text = (profile_dir() / "raspberry-pi-5.toml").read_text()
    tomllib.loads(text)  # the shipped file parses; the edits below break one field each
    path = tmp_path / "bad.toml"
    path.write_text(edit(text))
    return str(path)


def _set(field, value):
    return lambda text: re.sub(rf"(?m)^{field} = .*$", f"{field} = {value}", text, count=1)


PROFILE_CASES = {
    "unknown key": (lambda text: "bandwith_Bps = 1.0\n" + text, "unknown field(s) bandwith_Bps"),
    "missing field": (lambda text: re.sub(r"(?m)^eta_mem = .*\n", "", text, count=1),
                      "missing field(s) eta_mem"),
    "wrong type": (_set("memory_bytes", '"8GB"'), "field 'memory_bytes' must be a number"),
    "negative": (_set("bandwidth_Bps", "-1.0"), "field 'bandwidth_Bps' = -1.0 is out of range"),
    "zero": (_set("eta_compute", "0.0"), "field 'eta_compute' = 0.0 is out of range"),
}


@pytest.mark.parametrize("case", sorted(PROFILE_CASES))
def test_issue3_bad_profile_names_file_and_field(capfd, tmp_path, case):
    edit, phrase = PROFILE_CASES[case]
    path = _profile(tmp_path, edit)
    refused(capfd, ["devices", path], f"device profile {path}", phrase)


def test_issue3_bad_profile_given_to_search(capfd, model, tmp_path):
    path = _profile(tmp_path, PROFILE_CASES["negative"][0])
    refused(capfd, search_argv(model, tmp_path / "runs", "d", "--device", path),
            f"device profile {path}", "'bandwidth_Bps' = -1.0 is out of range")


# ---- issue 4 (pick and front) ----------------------------------------------------------------

@pytest.mark.parametrize("case, phrases", [
    ("no such trial", ["trial 999 does not exist", "front trials:"]),
    ("infeasible trial", ["trial 0 is not feasible", "nearest front point", "--trial"]),
    ("out exists", ["exists and is not empty", "--force"]),
    ("unknown column", ["unknown column 'nope'", "columns:"]),
    ("code in --where", ["is not a comparison"]),
])
def test_issue4_pick(capfd, run, tmp_path, case, phrases):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    marker = tmp_path / "ran"
    argv = {
        "no such trial": ["--trial", "999", "--out", tmp_path / "o"],
        "infeasible trial": ["--trial", "0", "--out", tmp_path / "o"],
        "out exists": ["--trial", "1", "--out", tmp_path / "full"],
        "unknown column": ["--best", "perplexity", "--where", "nope > 1", "--out", tmp_path / "o"],
        "code in --where": ["--best", "perplexity", "--where",
                            f"__import__('os').system('touch {marker}')", "--out", tmp_path / "o"],
    }[case]
    refused(capfd, ["pick", run, *argv], *phrases)
    assert not (tmp_path / "o").exists() and not marker.exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_issue4_trial_0_is_the_infeasible_one(run):
    import pandas as pd

    t = pd.read_csv(run / "trials.csv").set_index("trial")
    assert t.loc[0, "baseline"] == "uniform f16" and not t.loc[0, "feasible"]


@pytest.mark.parametrize("expr, phrase", [
    ("nope > 1", "unknown column 'nope'"),
    ("__import__('os').system('true')", "is not a comparison"),
    ("open('x') == 1", "--where"),
])
def test_issue4_front_where(capfd, run, expr, phrase):
    refused(capfd, ["front", run, "--where", expr], phrase)


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_issue4_out_that_cannot_be_a_folder(capfd, run, tmp_path, where):
    f = tmp_path / "afile"
    f.write_text("mine")
    out = f if where == "is a file" else f / "sub"
    refused(capfd, ["pick", run, "--trial", "1", "--out", out, "--force"], str(f))
    assert f.read_text() == "mine"


@pytest.mark.parametrize("command", ["search --runs-dir", "front --plot", "devices --out"])
def test_issue15_output_path_under_a_file(capfd, model, run, tmp_path, command):
    f = tmp_path / "afile"
    f.write_text("mine")
    argv = {"search --runs-dir": search_argv(model, f / "runs", "s"),
            "front --plot": ["front", run, "--plot", f / "front.png"],
            "devices --out": ["devices", "raspberry-pi-5", "--refit", "layer", "--out",
                              f / "pi.toml"]}[command]
    refused(capfd, argv, str(f))
    assert f.read_text() == "mine"


# ---- issue 5 (distributed) -------------------------------------------------------------------

def test_issue5_unreachable_ray_address(capfd, model, tmp_path):
    port = free_port()
    refused(capfd, search_argv(model, tmp_path / "runs", "r", "--backend", "ray", "--address",
                               f"127.0.0.1:{port}"),
            f"--address 127.0.0.1:{port}", "no Ray head answers")


def test_issue5_unreachable_storage_hides_the_password(capfd, model, tmp_path):
    port = free_port()
    line = refused(capfd, search_argv(model, tmp_path / "runs", "s", "--storage",
                                      f"postgresql://me:secret@127.0.0.1:{port}/x"),
                   f"127.0.0.1:{port}", "cannot open the database")
    assert "secret" not in line


def test_issue5_worker_for_a_study_that_does_not_exist(capfd, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    refused(capfd, ["worker", "--study", "nobody", "--storage", url, "--runs-dir",
                    tmp_path / "w", "--no-progress"],
            "no study 'nobody'", "--create-only")


def test_issue5_storage_study_made_with_another_space(capfd, model, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    runs = tmp_path / "runs"
    assert main([str(a) for a in search_argv(model, runs, "sp", "--storage", url,
                                             "--create-only")]) == 0
    capfd.readouterr()
    refused(capfd, search_argv(model, tmp_path / "runs2", "sp", "--storage", url, "--space",
                               "sparsity"),
            "settings differ", "space: was 'formats', now 'sparsity'")
