"""Untrusted input (issue 15), continued from test_untrusted.py: --where never runs code, a
study name never leaves --runs-dir, and a model's own Python never runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import llmpareto
from llmpareto.cli import main
from llmpareto.errors import UserError
from llmpareto.query import where
from llmpareto.tests.test_untrusted import run_search, tiny_args

# --- --where is parsed, never evaluated ------------------------------------------------------

FRAME = pd.DataFrame({"memory_bytes": [5e8, 2e9, 3e9, 4e9],
                      "latency_ms": [10.0, 4.0, 4.0, 9.0],
                      "perplexity": [30.0, 15.0, 25.0, 12.0],
                      "baseline": ["uniform f16", "", "", ""]})


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo pwned')", "@x", "a.b()", "`echo pwned`",
    "perplexity < -'x'", "perplexity < 'x'", "memory_bytes < 1e9 ; import os",
    "perplexity < 2 ** 10", "(" * 300 + "perplexity < 1" + ")" * 300,
    "not " * 2000 + "perplexity < 1", "perplexity < 1\0", "perplexity if 1 else 2",
])
def test_where_refuses_anything_but_comparisons(expr, capfd):
    with pytest.raises(UserError) as info:
        where(FRAME, expr)
    msg = str(info.value)
    assert msg.startswith("--where ") and repr(expr[:60])[1:-1] in msg
    assert "allowed: COLUMN OP NUMBER" in msg
    assert "pwned" not in capfd.readouterr().out


def test_where_evaluates_the_grammar():
    expr = "memory_bytes<=1e9 or (latency_ms<5 and not perplexity>20)"
    f = FRAME
    want = (f.memory_bytes <= 1e9) | ((f.latency_ms < 5) & ~(f.perplexity > 20))
    assert where(f, expr).index.tolist() == f.index[want].tolist() == [0, 1]
    assert where(f, "memory_bytes >= 2E+9 and latency_ms == 4").index.tolist() == [1, 2]
    assert where(f, "perplexity > -1.5e1").index.tolist() == [0, 1, 2, 3]
    assert where(f, " and ".join(["latency_ms < 5"] * 100)).index.tolist() == [1, 2]


def test_cli_where_is_one_error_line(tmp_path, tiny_model_dir, capsys):
    llmpareto.search(model=str(tiny_model_dir), runs_dir=str(tmp_path / "runs"), study="w",
                     window=64, eval_tokens=128, calib_tokens=0, trials=2, progress=False,
                     context=512, quantizer="rtn", formats="f16,q8_0", presets="none")
    capsys.readouterr()  # the search's own progress lines
    code = main(["front", str(tmp_path / "runs" / "w"), "--where",
                 "__import__('os').system('echo pwned')"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("llmpareto: error: --where ")
    assert captured.err.count("\n") == 1 and "pwned" not in captured.out


# --- study names never leave --runs-dir -----------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "/ABS", "a/b", "..", "a..b", ".hidden", "a\0b",
                                  "x\n", "-x", "_x", "x" * 101])
def test_study_names_that_could_escape(capsys, tmp_path, tiny_model_dir, name):
    name = name.replace("/ABS", str(tmp_path / "abs"))
    before = sorted(tmp_path.rglob("*"))
    code, err = run_search(capsys, *tiny_args(tiny_model_dir, tmp_path, f"--study={name}"))
    assert code == 2 and err.startswith("llmpareto: error: --study ")
    assert "letters, digits" in err and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing made, in runs/ or beside it
    with pytest.raises(UserError, match="--study"):
        llmpareto.search(model=str(tiny_model_dir), runs_dir=str(tmp_path / "runs"), study=name)


def test_study_escape_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmpareto.cli", "search", "--study", "../up",
                           "--runs-dir", str(tmp_path / "runs")], capture_output=True,
                          text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("llmpareto: error: --study '../up'")
    assert not (tmp_path / "up").exists() and not (tmp_path / "runs").exists()


def test_a_default_study_name_is_always_valid():
    from llmpareto.search.settings import SearchSettings
    from llmpareto.settings import check_study

    for model in ("a..b.gguf", "_x", "x" * 300, "...", "/m/"):
        check_study(SearchSettings(model=model).study)


# --- a model's own Python is never run (there is no flag to allow it) ------------------------

def test_remote_code_is_never_run(tiny_model_dir, tmp_path, capsys):
    from llmpareto.models import load_arch, load_model, resolve_model

    d = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "evil.EvilConfig",
                         "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "PWNED"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for load in (lambda: load_model(resolve_model(str(d))), lambda: load_arch(str(d))):
        with pytest.raises(UserError, match="never runs a model's own code") as info:
            load()
        assert "'evil_llama'" in str(info.value) and "auto_map" in str(info.value)
    code, err = run_search(capsys, *tiny_args(d, tmp_path))
    assert code == 2 and "never runs a model's own code" in err and err.count("\n") == 1
    assert not marker.exists()
