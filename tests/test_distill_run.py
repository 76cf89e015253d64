"""`llmpareto distill RUN --trial N`: a searched student recovered from the base model, recorded
next to its trial, resumed from its checkpoint, exported with `pick --distilled`."""

import gguf
import numpy as np
import pandas as pd
import pytest

import llmpareto
from llmpareto.cli import main
from llmpareto.formats import get_format
from llmpareto.gguf_write import gguf_name


@pytest.fixture(scope="module")
def student_run(tiny_model_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    llmpareto.search(model=str(tiny_model_dir), runs_dir=str(runs), study="d", window=64,
                     eval_tokens=128, calib_tokens=128, trials=4, progress=False, context=256,
                     space="formats,students", formats="q8_0,q4_0", student_blocks="2",
                     student_mlp_ratios="1,0.5", student_heads="2")
    run = runs / "d"
    t = pd.read_csv(run / "trials.csv")
    trial = int(t.index[t["baseline"] == "student mlp_ratio=0.5 + q8_0"][0])
    return run, trial


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()[-1] if out.err.strip() else ""


def test_distill_records_resumes_and_exports_the_recovered_student(student_run, capsys,
                                                                   tmp_path):
    run, trial = student_run
    rc, out, _ = _cli(capsys, "distill", run, "--trial", trial, "--steps", 4,
                      "--checkpoint-every", 2, "--lr", "1e-3", "--qat", "--no-progress")
    assert rc == 0 and "distilled_perplexity" in out
    t = pd.read_csv(run / "trials.csv").set_index("trial")
    first = t.loc[trial, "distilled_perplexity"]
    assert np.isfinite(first) and t.loc[trial, "distill_steps"] == 4
    assert pd.isna(t.drop(index=trial)["distilled_perplexity"]).all()
    # more steps continue from the checkpoint instead of starting over
    rc, out, _ = _cli(capsys, "distill", run, "--trial", trial, "--steps", 6,
                      "--checkpoint-every", 2, "--lr", "1e-3", "--qat", "--no-progress")
    assert rc == 0 and "resumed at 4" in out
    # the export holds the distilled weights in the recipe's formats, bit for bit
    assert main(["pick", str(run), "--trial", str(trial), "--out", str(tmp_path / "x"),
                 "--distilled", "--format", "gguf,hf"]) == 0
    from safetensors.torch import load_file

    distilled = load_file(str(run / "distill" / f"trial-{trial}" / "student.safetensors"))
    fqn = "model.layers.0.mlp.down_proj"
    w = distilled[fqn].numpy()
    assert w.shape == (64, 128)  # the student's narrower MLP
    f = get_format("q8_0")
    expected = f.dequantize(f.quantize(w), w.shape)
    tensors = {x.name: x for x in gguf.GGUFReader(tmp_path / "x" / "model.gguf").tensors}
    t = tensors[gguf_name(fqn + ".weight", 2)]
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    hf = load_file(str(tmp_path / "x" / "hf" / "model.safetensors"))[fqn + ".weight"].numpy()
    assert np.array_equal(hf, expected)  # on the q8_0 grid: what QAT trained against


@pytest.mark.parametrize("argv, match", [
    (["--trial", "99", "--steps", "2"], "trial 99 does not exist"),
    (["--trial", "0", "--steps", "0"], "at least 1 step"),
    (["--trial", "0", "--steps", "2", "--seq-len", "1000"], "--seq-len 1000"),
])
def test_bad_distill_input_is_one_clear_error_and_changes_nothing(student_run, capsys, argv,
                                                                  match):
    run, _ = student_run
    before = (run / "trials.csv").read_bytes()
    rc, _, last = _cli(capsys, "distill", run, *argv)
    assert rc == 2 and last.startswith("llmpareto: error:") and match in last
    assert (run / "trials.csv").read_bytes() == before


def test_pick_distilled_needs_a_distilled_trial(student_run, capsys, tmp_path):
    run, _ = student_run
    rc, _, last = _cli(capsys, "pick", run, "--trial", 0, "--out", tmp_path / "y", "--distilled")
    assert rc == 2 and "has not been distilled" in last and not (tmp_path / "y").exists()


def test_distill_front_halves_the_candidates_each_round(student_run, capsys):
    run, _ = student_run
    front = pd.read_csv(run / "front.csv")
    rc, out, _ = _cli(capsys, "distill", run, "--front", "--steps", 1, "--rounds", 2,
                      "--no-progress", "--checkpoint-every", 1)
    assert rc == 0 and "recorded in trials.csv" in out
    t = pd.read_csv(run / "front.csv").set_index("trial")
    steps = t["distill_steps"].astype(int)
    n = len(front)
    assert (steps >= 1).all() and int((steps == 2).sum()) == max(1, -(-n // 2))


def test_distill_on_a_run_whose_model_is_gone_is_one_error(student_run, capsys, tmp_path):
    import json
    import shutil

    run, trial = student_run
    copy = tmp_path / "moved"
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    info["settings"]["model"] = str(tmp_path / "deleted-model")
    (copy / "run.json").write_text(json.dumps(info))
    before = (copy / "trials.csv").read_bytes()
    rc, _, last = _cli(capsys, "distill", copy, "--trial", trial, "--steps", 1, "--no-progress")
    assert rc == 2 and last.startswith("llmpareto: error:") and "deleted-model" in last
    assert (copy / "trials.csv").read_bytes() == before


def test_a_killed_distillation_resumes_from_its_checkpoint(student_run, tmp_path):
    """SIGKILL the `distill` process once a checkpoint exists; the same command continues from
    it and ends with the weights of a run that was never interrupted."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    run, trial = student_run
    runs = {}
    for name in ("killed", "straight"):
        runs[name] = tmp_path / name
        shutil.copytree(run, runs[name], ignore=shutil.ignore_patterns("distill"))
    argv = ["--trial", str(trial), "--steps", "120", "--checkpoint-every", "2", "--no-progress",
            "--lr", "1e-3"]
    cmd = [sys.executable, "-m", "llmpareto.cli", "distill"]
    ckpt = runs["killed"] / "distill" / f"trial-{trial}" / "checkpoint.pt"
    proc = subprocess.Popen(cmd + [str(runs["killed"])] + argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), proc.stderr.read()[-2000:]
    at_kill = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= at_kill < 120
    again = subprocess.run(cmd + [str(runs["killed"])] + argv, capture_output=True, text=True,
                           check=False)
    assert again.returncode == 0 and f"resumed at {at_kill}" in again.stdout, again.stderr[-2000:]
    straight = subprocess.run(cmd + [str(runs["straight"])] + argv, capture_output=True,
                              text=True, check=False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = (load_file(str(runs[n] / "distill" / f"trial-{trial}" / "student.safetensors"))
            for n in ("killed", "straight"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


def test_distill_removes_a_killed_writers_temporaries_not_a_live_ones(student_run, capsys,
                                                                     tmp_path, dead_pid):
    """A distil killed while writing trials.csv or its checkpoint leaves `.<name>.<pid>.*.tmp`;
    the next `distill` on the run removes those of dead processes and keeps a live writer's."""
    import os
    import shutil

    run, trial = student_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("distill"))
    ck = copy / "distill" / f"trial-{trial}"
    ck.mkdir(parents=True)
    left = [copy / f".trials.csv.{dead_pid}.k1ll3d.tmp", ck / f".checkpoint.pt.{dead_pid}.x.tmp"]
    live = copy / f".front.csv.{os.getpid()}.l1ve.tmp"
    for p in (*left, live):
        p.write_bytes(b"half")
    rc, out, _ = _cli(capsys, "distill", copy, "--trial", trial, "--steps", 1, "--no-progress")
    assert rc == 0 and "distilled_perplexity" in out
    assert not any(p.exists() for p in left)
    assert live.exists()
    assert sorted(p.name for p in copy.rglob("*.tmp")) == [live.name]
