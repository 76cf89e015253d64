"""Issue 15's audit, issues 10-15 (issues 2-5: test_bad_input_audit.py, whose helpers and
fixtures this file shares): one `llmpareto: error:` line carrying the message, exit status 2,
no Python traceback."""

from __future__ import annotations

import json
import re

import pytest

from llmpareto.tests.test_bad_input_audit import (  # noqa: F401 - fixtures are used by name
    ERROR,
    RUN_FLAGS,
    model,
    outcome,
    refused,
    run,
    run_copy,
    search_argv,
)

# ---- issue 10 (sparsity) ---------------------------------------------------------------------

@pytest.mark.parametrize("extra, phrase", [
    (["--sparsity-levels", "0,1.2"], "every level must be in [0, 1)"),
    (["--sparsity-levels=-0.1,0.5"], "every level must be in [0, 1)"),
    (["--sparsity-pattern", "4:4"], "N < M"),
    (["--sparsity-pattern", "4:2"], "N < M"),
    (["--sparsity-pattern", "3:5"], "5 does not divide rows"),
    (["--sparsity-method", "wanda", "--calib-tokens", "0"], "set --calib-tokens > 0"),
    (["--sparsity-method", "sparsegpt", "--calib-tokens", "0"], "set --calib-tokens > 0"),
    (["--space", "formats,sparsity", "--sparsity-pattern", "2:4", "--formats", "q8_0,q4_1"],
     "--formats q4_1"),
])
def test_issue10_sparsity_input(capfd, model, tmp_path, extra, phrase):
    line = refused(capfd, search_argv(model, tmp_path / "runs", "sp", "--space", "sparsity",
                                      *extra), phrase)
    if "q4_1" in extra:
        assert "pattern is lost" in line
    assert not (tmp_path / "runs" / "sp" / "study.db").exists()


# ---- issue 11 (students and distillation) ----------------------------------------------------

@pytest.mark.parametrize("extra, phrase", [
    (["--student-blocks", "3,2"], "never larger than its teacher"),  # the teacher has 2
    (["--student-mlp-ratios", "1.5"], "never larger than its teacher"),
    (["--student-heads", "3"], "[1, 2]"),  # 2 KV heads: 3 breaks the attention groups
    (["--student-blocks", "0"], "--student-blocks"),
])
def test_issue11_student_input(capfd, model, tmp_path, extra, phrase):
    refused(capfd, search_argv(model, tmp_path / "runs", "st", "--space", "formats,students",
                               *extra), phrase)
    assert not (tmp_path / "runs" / "st" / "study.db").exists()


@pytest.mark.parametrize("argv, phrase", [
    (["--trial", "99", "--steps", "1"], "trial 99 does not exist"),
    (["--trial", "1", "--steps", "0"], "--steps 0: distil for at least 1 step"),
])
def test_issue11_distill_input(capfd, run_copy, argv, phrase):
    before = (run_copy / "trials.csv").read_bytes()
    refused(capfd, ["distill", run_copy, *argv, "--no-progress"], phrase)
    assert (run_copy / "trials.csv").read_bytes() == before


def test_issue11_distill_a_run_whose_model_is_gone(capfd, run_copy, tmp_path):
    info = json.loads((run_copy / "run.json").read_text())
    info["settings"]["model"] = str(tmp_path / "deleted-model")
    (run_copy / "run.json").write_text(json.dumps(info))
    before = (run_copy / "trials.csv").read_bytes()
    refused(capfd, ["distill", run_copy, "--trial", "1", "--steps", "1", "--no-progress"],
            "deleted-model", "no such model or path")
    assert (run_copy / "trials.csv").read_bytes() == before


def test_issue11_distill_a_folder_that_is_not_a_run(capfd, tmp_path):
    refused(capfd, ["distill", tmp_path, "--trial", "1", "--steps", "1", "--no-progress"],
            "not a llmpareto run directory")


# ---- issue 12 (quantizers): the i-quant case as the issue words it ---------------------------

def test_issue12_an_iquant_with_imatrix_off(capfd, model, tmp_path):
    refused(capfd, search_argv(model, tmp_path / "runs", "q", "--formats", "q4_0,iq2_xxs",
                               "--quantizer", "rtn", "--imatrix", "off"),
            "iq2_xxs cannot be made without an importance matrix")
    assert not (tmp_path / "runs" / "q" / "study.db").exists()


# ---- issue 13 (strategies): a sensitivity profile of other weights, through the CLI ----------

def test_issue13_sensitivity_profile_of_another_model(capfd, model, run, tmp_path):
    data = json.loads((run / "sensitivity.json").read_text())
    data["model_sha256"] = "0" * 64  # as a profile of other weights would say
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    refused(capfd, search_argv(model, tmp_path / "runs", "k", *RUN_FLAGS, "--sensitivity",
                               other),
            str(other), "another model weights")
    assert not (tmp_path / "runs" / "k" / "study.db").exists()


# ---- issue 15 (untrusted input): recipe JSON with unknown keys or impossible values ----------

@pytest.mark.parametrize("edit, phrase", [
    (lambda r: {**r, "colour": "red"}, "unknown key(s) ['colour']"),
    (lambda r: {**r, "modules": {"model.embed_tokens": {"fmt": "q8_0"}}}, "unknown key"),
    (lambda r: {**r, "modules": {"model.embed_tokens": {"format": "q9_9"}}},
     "unknown weight format 'q9_9'"),
    (lambda r: {**r, "modules": {"model.embed_tokens": {"pattern": "7:3"}}}, "7:3"),
    (lambda r: {**r, "version": 99}, "newer"),
    (None, "not valid JSON"),
])
def test_issue15_recipe_json(capfd, model, run, tmp_path, edit, phrase):
    recipe = json.loads((run / "recipes" / "1.json").read_text())
    path = tmp_path / "recipe.json"
    path.write_text("{not json" if edit is None else json.dumps(edit(recipe)))
    refused(capfd, ["cost", "--model", model, "--recipe", path], phrase)


@pytest.mark.parametrize("command", ["pick", "distill"])
def test_issue15_a_trial_is_a_number_never_a_path(capfd, run, tmp_path, command):
    """recipes/<trial>.json cannot be steered out of the run: argparse takes only an int."""
    extra = ["--out", tmp_path / "o"] if command == "pick" else ["--steps", "1"]
    rc, err = outcome(capfd, [command, run, "--trial", "../../0", *extra])
    assert rc == 2 and re.search(rf"(?m)^llmpareto {command}: error: argument --trial: "
                                 r"invalid int value: '../../0'$", err), err


# ---- issue 14 (GPU trials: --torch-device, --torch-dtype) -------------------------------------


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_issue14_cuda_without_cuda(capfd, model, tmp_path):
    if _cuda_count():
        pytest.skip("this machine has CUDA")
    line = refused(capfd, search_argv(model, tmp_path / "runs", "g", "--torch-device", "cuda"),
                   "--torch-device")
    assert "unrecognized arguments" not in line and "CUDA" in line.upper()


def test_issue14_a_gpu_index_the_machine_does_not_have(capfd, model, tmp_path):
    index = max(3, _cuda_count())  # cuda:3 on a one-GPU machine; one past the last elsewhere
    line = refused(capfd, search_argv(model, tmp_path / "runs", "g", "--torch-device",
                                      f"cuda:{index}"), f"cuda:{index}")
    assert "unrecognized arguments" not in line


def test_issue14_float16_where_the_device_cannot_run_it(capfd, model, tmp_path):
    """Whether CPU float16 is refused is issue 14's call: it runs, or says so in one line."""
    rc, err = outcome(capfd, search_argv(model, tmp_path / "runs", "g", "--torch-device", "cpu",
                                         "--torch-dtype", "float16", "--strategy", "random"))
    assert "unrecognized arguments" not in err
    if rc != 0:
        lines = ERROR.findall(err)
        assert rc == 2 and len(lines) == 1 and "float16" in lines[0], err[-3000:]


def test_issue14_a_model_too_large_for_the_device_and_the_host(capfd, model, tmp_path,
                                                               monkeypatch):
    """Refused with the numbers before anything is allocated (the host's memory as issue 15's
    llmpareto.models.available_memory_bytes reports it)."""
    from llmpareto import models

    monkeypatch.setattr(models, "available_memory_bytes", lambda: 1000)
    refused(capfd, search_argv(model, tmp_path / "runs", "g", "--torch-device", "cpu"),
            "1000 bytes")
