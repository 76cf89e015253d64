"""Every bad input gives one clear message (exit 2, no traceback) and loses nothing."""

import subprocess
import sys

import numpy as np
import pytest

from llmpareto.cli import main


def run_cli(capsys, *argv):
    code = main(["search", "--no-progress", *argv])
    err = capsys.readouterr().err
    return code, err


def tiny_args(tiny_model_dir, tmp_path, *extra):
    return ["--model", str(tiny_model_dir), "--runs-dir", str(tmp_path / "runs"),
            "--window", "64", "--eval-tokens", "256", "--calib-tokens", "128",
            "--context", "512", *extra]


def test_unknown_model_name_lists_accepted_forms(capsys, tmp_path):
    code, err = run_cli(capsys, "--model", "no-such-model", "--runs-dir", str(tmp_path))
    assert code == 2 and "no such model" in err and "smollm2-135m" in err and ".gguf" in err


def test_missing_model_path(capsys, tmp_path):
    code, err = run_cli(capsys, "--model", str(tmp_path / "nowhere" / "model"))
    assert code == 2 and "accepted forms" in err


def test_hub_id_not_in_cache_is_not_downloaded(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, err = run_cli(capsys, "--model", "someone/not-cached-model")
    assert code == 2 and "not in the local Hugging Face cache" in err


def test_pickle_checkpoint_needs_allow_pickle(capsys, tmp_path, tiny_model_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    code, err = run_cli(capsys, "--model", str(d))
    assert code == 2 and "--allow-pickle" in err and "pytorch_model.bin" in err


@pytest.mark.parametrize("content, match", [(None, "no such file"), ("   \n", "is empty"),
                                            ("a few words only", "tokens but")])
def test_bad_text(capsys, tmp_path, tiny_model_dir, content, match):
    f = tmp_path / "text.txt"
    if content is not None:
        f.write_text(content)
    code, err = run_cli(capsys, *tiny_args(tiny_model_dir, tmp_path, "--text", str(f)))
    assert code == 2 and match in err


@pytest.mark.parametrize("value", ["lots", "12XB", "-5MB", "0"])
def test_max_memory_that_does_not_parse(capsys, value):
    code, err = run_cli(capsys, f"--max-memory={value}")
    assert code == 2 and "--max-memory" in err and "120MB" in err and "0.5GB" in err


def test_budget_below_smallest_candidate_names_the_floor(capsys, tmp_path, tiny_model_dir):
    code, err = run_cli(capsys, *tiny_args(tiny_model_dir, tmp_path, "--max-memory", "1000"))
    assert code == 2 and "smallest candidate" in err and "bytes" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("name", ["a/b", "../up", "x\\y", ""])
def test_study_name_with_path_separators(capsys, name):
    code, err = run_cli(capsys, "--study", name)
    assert code == 2 and "--study" in err


def test_corrupted_study_db_is_reported_and_left_alone(capsys, tmp_path, tiny_model_dir):
    args = tiny_args(tiny_model_dir, tmp_path, "--study", "c", "--trials", "3")
    assert run_cli(capsys, *args)[0] == 0
    db = tmp_path / "runs" / "c" / "study.db"
    garbage = b"this is not a database" * 100
    db.write_bytes(garbage)
    code, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and "cannot be opened" in err and "Nothing was changed" in err
    assert db.read_bytes() == garbage


def test_resume_with_different_settings(capsys, tmp_path, tiny_model_dir):
    args = tiny_args(tiny_model_dir, tmp_path, "--study", "r", "--trials", "3")
    assert run_cli(capsys, *args)[0] == 0
    before = (tmp_path / "runs" / "r" / "study.db").read_bytes()
    code, err = run_cli(capsys, *args, "--resume", "--granularity", "block")
    assert code == 2 and "granularity" in err and "was 'type'" in err
    assert (tmp_path / "runs" / "r" / "study.db").read_bytes() == before


def test_existing_study_without_resume(capsys, tmp_path, tiny_model_dir):
    args = tiny_args(tiny_model_dir, tmp_path, "--study", "e", "--trials", "2")
    assert run_cli(capsys, *args)[0] == 0
    code, err = run_cli(capsys, *args)
    assert code == 2 and "--resume" in err


def test_cli_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmpareto.cli", "search", "--max-memory",
                           "ten", "--runs-dir", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--max-memory 'ten'" in proc.stderr


def test_unknown_device_and_impossible_latency(capsys, tmp_path, tiny_model_dir):
    code, err = run_cli(capsys, *tiny_args(tiny_model_dir, tmp_path, "--device", "toaster"))
    assert code == 2 and "unknown device" in err and "raspberry-pi-5" in err
    code, err = run_cli(capsys, *tiny_args(tiny_model_dir, tmp_path, "--max-latency-ms", "1e-6"))
    assert code == 2 and "--max-latency-ms" in err and "smallest candidate" in err
    code, err = run_cli(capsys, *tiny_args(tiny_model_dir, tmp_path, "--max-energy-mj", "x"))
    assert code == 2 and "--max-energy-mj" in err


@pytest.mark.parametrize("argv, match", [
    (["--threads", "2"], "--threads is for --runtime llamacpp"),
    (["--runtime", "llamacpp", "--threads", "0"], "--threads 0: give 1 or more"),
    (["--like", "smollm2-135m"], "--like is for --runtime llamacpp"),
    (["--runtime", "llamacpp", "--like", "no-such-model"], "no such model"),
])
def test_profile_host_llamacpp_flags(capsys, argv, match):
    assert main(["profile-host", "--quick", *argv]) == 2
    assert match in capsys.readouterr().err


def _foreign_imatrix(tmp_path):
    """An imatrix file as llama-imatrix writes it, for a model 2048 wide."""
    from llmpareto.compress.imatrix import write_imatrix

    path = tmp_path / "other.gguf"
    write_imatrix(path, {"blk.0.attn_q.weight": np.ones(2048, np.float32)}, tokens=512)
    return path


@pytest.mark.parametrize("extra, match", [
    # GPTQ's x^T x needs full rank: the tiny model's widest input is 256 (down_proj)
    (["--quantizer", "gptq", "--calib-tokens", "128"],
     "--quantizer gptq needs at least 256 calibration tokens"),
    # llama.cpp refuses to make iq2_xxs without an importance matrix
    (["--formats", "q4_0,iq2_xxs", "--quantizer", "rtn"], "iq2_xxs cannot be made without"),
    (["--imatrix", "off"], "--quantizer imatrix --imatrix off"),
    (["--quantizer", "gptq", "--formats", "q8_0,q4_K"], "--quantizer gptq cannot target q4_K"),
    (["--quantizer", "awq"], "--quantizer 'awq'; choose one of rtn, imatrix, gptq"),
    (["--imatrix", "/no/such/imatrix.dat"], "no such file"),
    (["--presets", "Q4_K_X"], "unknown llama.cpp preset"),
    ("foreign", "made for another model"),
])
def test_bad_quantizer_input_is_one_line_and_stores_nothing(capsys, tmp_path, tiny_model_dir,
                                                            extra, match):
    if extra == "foreign":
        extra = ["--imatrix", str(_foreign_imatrix(tmp_path))]
    code, err = run_cli(capsys, *tiny_args(tiny_model_dir, tmp_path, "--study", "q", *extra))
    assert code == 2 and match in err, err
    assert err.count("llmpareto: error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs" / "q" / "study.db").exists()
