"""Recovery inside the search (issue 26): the front measured on an evaluation text of another
domain, recovered by the registry's methods, recorded per text and per stage, resumable after
a kill, exported bit for bit; the evaluation text is never read by calibration or training."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import gguf
import numpy as np
import pandas as pd
import pytest

import llmpareto
from llmpareto.cli import main

QUALITY = ["perplexity", "kl_nats"]
STAGES = {"": QUALITY, "eval_text_": QUALITY}
RECOVERED = [f"recovered_{t}{m}" for t in ("", "eval_text_") for m in QUALITY]


def _settings(tiny_model_dir, tmp_path, **kw) -> dict:
    return {"model": str(tiny_model_dir), "runs_dir": str(tmp_path / "runs"), "study": "r",
            "window": 64, "eval_tokens": 256, "calib_tokens": 128, "trials": 8,
            "progress": False, "context": 512, "formats": "f16,q8_0,q5_0,q4_1,q4_0",
            "presets": "none", "recover_steps": 4, "recover_rounds": 2,
            "recover_tokens": 512, **kw}


@pytest.fixture(scope="module")
def recovered_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recover")
    # enough steps and windows that some point gains on held-out windows (tiny random model)
    llmpareto.search(**_settings(tiny_model_dir, tmp, recover_steps=15, recover_tokens=1024))
    return tmp / "runs" / "r"


def test_recovered_columns_per_text_and_stage_in_trials_and_front(recovered_run):
    t = pd.read_csv(recovered_run / "trials.csv")
    front = pd.read_csv(recovered_run / "front.csv")
    for df in (t, front):
        for col in ["perplexity", "kl_nats", "eval_text_perplexity", "eval_text_kl_nats",
                    *RECOVERED, "recover_method", "recover_steps"]:
            assert col in df.columns, col
    tried = t[t["recover_steps"].notna()]
    assert len(tried) >= 2
    # formats only: reconstruction, then (round 2) quantization-aware training from there
    assert set(tried.loc[tried["recover_steps"] == 15, "recover_method"]) == {"reconstruct"}
    assert set(tried.loc[tried["recover_steps"] == 30, "recover_method"]) == {"qat"}
    chains = set(tried.loc[tried["recover_used"].astype(bool), "recover_chain"])
    assert chains and chains <= {"reconstruct", "reconstruct+qat"}
    assert np.isfinite(tried["recover_holdout_kl_nats"]).all()
    assert np.isfinite(tried["recover_guard_kl_nats"]).all()  # the guard text was measured
    assert set(tried["recover_veto"].fillna("")) <= {"", "holdout", "guard"}
    done = tried[tried["recover_used"].astype(bool)]  # closer to the base on held-out windows
    assert len(done) >= 1
    for col in ["eval_text_perplexity", "eval_text_kl_nats", *RECOVERED]:
        assert np.isfinite(done[col]).all() and (done[col] >= 0).all(), col
    # successive halving: round 2 (30 steps) is the better half of round 1's points that
    # gained (15 steps)
    steps = tried["recover_steps"].value_counts().to_dict()
    assert set(steps) == {15.0, 30.0}
    gained = tried[(tried["recover_steps"] == 30) | tried["recover_used"].astype(bool)]
    assert steps[30.0] == -(-len(gained) // 2)
    # measured on the two texts: they are different numbers
    assert (done["eval_text_perplexity"] != done["perplexity"]).all()
    # the front is built from the recovered metrics where they exist
    from llmpareto.front import effective, front_mask

    mask = front_mask(t, ["perplexity", "memory_bytes"])
    assert set(front["trial"]) == set(t.loc[mask, "trial"])
    eff = effective(t, ["perplexity", "memory_bytes"])
    assert (eff.loc[done.index, "perplexity"] == done["recovered_perplexity"]).all()


def test_pick_exports_the_recovered_weights_bit_for_bit(recovered_run, tmp_path):
    """The GGUF of a recovered front point holds what was scored: the blocks as learned
    (reconstruction), or the run's quantizer's blocks of the trained floats (qat)."""
    from safetensors.torch import load_file

    from llmpareto.formats import get_format
    from llmpareto.gguf_write import gguf_name, unpermute_rows
    from llmpareto.recipe import Recipe
    from llmpareto.rundir import RunDir
    from llmpareto.search.recover import PACKED, load_recovered, set_start
    from llmpareto.search.workbench import Workbench

    front = pd.read_csv(recovered_run / "front.csv")
    row = front[front["recover_used"].fillna(False).astype(bool)].iloc[0]
    trial = int(row["trial"])
    assert main(["pick", str(recovered_run), "--trial", str(trial), "--out",
                 str(tmp_path / "x"), "--format", "gguf"]) == 0
    w = load_file(str(recovered_run / "recover" / f"trial-{trial}.safetensors"))
    tensors = {x.name: x for x in gguf.GGUFReader(tmp_path / "x" / "model.gguf").tensors}
    bench = Workbench.from_run(recovered_run)
    config = bench.model.config
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    assert w
    recipe = Recipe.load(RunDir(recovered_run).recipe_path(trial))
    weights, exact = load_recovered(recovered_run, trial)
    assert exact == (row["recover_chain"] == "reconstruct")  # qat's floats are re-quantized
    set_start(bench, recipe, weights, exact)
    formats = bench.arch.formats_for(recipe)
    for fqn, arr in w.items():
        if fqn.startswith(PACKED):  # the blocks learned onto the run's scales, dequantized
            continue  # below as the weights next to them
        t = tensors[gguf_name(fqn + ".weight", config.num_hidden_layers)]
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(arr.shape)
        kind = fqn.rsplit(".", 1)[1]
        if kind in heads:  # llama.cpp's row order for rotary heads
            back = unpermute_rows(back, heads[kind])
        if exact:
            assert np.array_equal(back, arr.numpy()), fqn
        # what the run scored: the blocks its cache made of them
        f = get_format(formats[fqn])
        scored = f.dequantize(np.asarray(bench.cache.get(fqn, formats[fqn])), arr.shape)
        assert np.array_equal(back, scored), fqn
    bench.cache.set_override({})
    # and they differ from the post-training weights somewhere (recovery changed them)
    assert main(["pick", str(recovered_run), "--trial", str(trial), "--out",
                 str(tmp_path / "ptq"), "--format", "gguf", "--no-recovered"]) == 0
    ptq = {x.name: np.array(x.data) for x in gguf.GGUFReader(tmp_path / "ptq" / "model.gguf").tensors}
    assert any(not np.array_equal(ptq[n], np.array(tensors[n].data)) for n in ptq)


def test_recovery_lowers_kl_on_the_windows_it_never_learned_on(tiny_model_dir, tmp_path):
    """On the tiny random model, 30 steps of reconstruction lower the KL to the base on the
    evaluation windows (never learned on) for uniform q4_0; what recovery learned on is the
    calibration text."""
    s = _settings(tiny_model_dir, tmp_path, formats="q4_0,f16", trials=2, recover_steps=30,
                  recover_rounds=1, recover_tokens=1024)
    llmpareto.search(**s)
    t = pd.read_csv(tmp_path / "runs" / "r" / "trials.csv").set_index("baseline")
    row = t.loc["uniform q4_0"]
    assert row["recover_method"] == "reconstruct"
    assert row["recovered_kl_nats"] < row["kl_nats"]


def test_the_eval_text_is_never_read_by_calibration_or_training(tiny_model_dir, tmp_path,
                                                               monkeypatch):
    """Every forward pass of every model the search loads (the candidate, a teacher) is
    watched: a batch holding a window of the evaluation text (or of recovery's guard
    text) may only come from measuring
    (`text_scores`, the base log-probs in `Measure`). The test fails if calibration (the
    importance matrix, GPTQ, pruning statistics), a trial or recovery ever reads one; and it
    checks that the measurement did read them, so the watch is known to work."""
    from llmpareto import models
    from llmpareto.search import recover, workbench
    from llmpareto.text import eval_text_windows, read_eval_text

    eval_text = tmp_path / "held-out.txt"
    eval_text.write_text(" ".join(f"zebra{i} quartz{i % 7} ledger" for i in range(900)))
    guard = tmp_path / "guard.txt"  # recovery's guard text: only measured, like the eval text
    guard.write_text(" ".join(f"def f{i}(x): return x * {i % 5}" for i in range(700)))
    loaded = []
    real = models.load_model

    def watched(*a, **k):
        model, tok = real(*a, **k)
        loaded.append((model, tok))
        model.get_input_embeddings().register_forward_pre_hook(spy)
        return model, tok

    seen = {"measure": 0, "elsewhere": []}
    held: list[np.ndarray] = []

    def spy(module, args):
        if not held:
            return
        ids = args[0].detach().cpu().numpy()
        rows = {r.tobytes() for r in held[0]}
        if not any(r.tobytes() in rows for r in ids.reshape(-1, ids.shape[-1])):
            return
        names = {f.function for f in inspect.stack(0)}
        if names & {"text_scores", "__init__"} and "Measure" in repr(
                [f.frame.f_locals.get("self") for f in inspect.stack(0)]):
            seen["measure"] += 1
        else:
            seen["elsewhere"].append(sorted(names)[:20])

    monkeypatch.setattr(models, "load_model", watched)
    monkeypatch.setattr(workbench, "load_model", watched)
    orig_windows = recover.eval_text_windows

    def with_held(bench):
        w = orig_windows(bench)
        held.append(w)
        return w

    monkeypatch.setattr(recover, "eval_text_windows", with_held)
    # the windows the search will cut, known before it starts, so calibration is watched too
    _, tok = real(models.resolve_model(str(tiny_model_dir)))
    for text in (eval_text, guard):
        held.append(eval_text_windows(tok, read_eval_text(str(text), None), 64, 256)[0])
    held[:] = [np.concatenate(held)]
    s = _settings(tiny_model_dir, tmp_path, eval_text=str(eval_text), eval_text_tokens=256,
                  recover_guard=str(guard),
                  quantizer="gptq", calib_tokens=256, formats="q4_0,q8_0", trials=4,
                  recover_rounds=1)
    llmpareto.search(**s)
    assert seen["elsewhere"] == [], seen["elsewhere"][:2]
    assert seen["measure"] > 0  # the watch saw the measurement read them
    t = pd.read_csv(tmp_path / "runs" / "r" / "trials.csv")
    assert t["recovered_eval_text_kl_nats"].notna().any()


def test_recovery_resumes_after_a_kill(tiny_model_dir, tmp_path):
    """SIGKILL during recovery, once some points are recovered: --resume keeps what was
    recorded (not recovered again) and recovers the rest."""
    s = _settings(tiny_model_dir, tmp_path, recover_steps=150, recover_rounds=1, trials=8,
                  formats="q8_0,q5_0,q4_1,q4_0")
    argv = [sys.executable, "-m", "llmpareto.cli", "search", "--no-progress"]
    for k, v in s.items():
        if k != "progress":
            argv += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = tmp_path / "runs" / "r" / "study.db"

    def recorded() -> dict:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                row = con.execute("select value_json from study_user_attributes where key = ?",
                                  ("llmpareto_after_search",)).fetchone()
        except sqlite3.Error:
            return {}
        return {k: v for k, v in json.loads(row[0]).items() if "recover_steps" in v} \
            if row else {}

    deadline = time.time() + 300
    while not recorded() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the search ended before the kill: give recovery more steps"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = recorded()
    plan = None
    with sqlite3.connect(db) as con:
        row = con.execute("select value_json from study_user_attributes where key = ?",
                          ("llmpareto_recover_rounds",)).fetchone()
        plan = json.loads(row[0])["0"]
    assert 1 <= len(before) < len(plan), (before, plan)  # killed mid-way, for real
    llmpareto.search(**s, resume=True)
    t = pd.read_csv(tmp_path / "runs" / "r" / "trials.csv").set_index("trial")
    assert t.loc[plan, "recover_steps"].notna().all()
    for trial, values in before.items():  # kept, not recomputed
        assert t.loc[int(trial), "recover_s"] == values["recover_s"]
    info = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert info["status"] == "finished"


@pytest.mark.parametrize("extra, match", [
    (["--recover-steps", "-1"], "--recover-steps -1: give 0 (no recovery) or more steps"),
    (["--eval-text", "/nonexistent/x.txt"], "--eval-text /nonexistent/x.txt: no such file"),
    (["--eval-text", "EMPTY"], "is empty"),
    (["--eval-text", "SAME", "--text", "SAME"], "is the same text as --text"),
    (["--recover-method", "magic"], "--recover-method 'magic'; choose auto or one of"),
    (["--recover-steps", "2", "--recover-guard", "/nonexistent/g.txt"],
     "--recover-guard /nonexistent/g.txt: no such file"),
    (["--recover-steps", "2", "--recover-guard", "EMPTY"], "--recover-guard EMPTY is empty"),
    (["--recover-steps", "2", "--recover-guard", "SAME", "--text", "SAME"],
     "--recover-guard SAME is the same text as --text"),
    (["--recover-steps", "2", "--recover-guard", "SAME", "--eval-text", "SAME2"],
     "--recover-guard SAME is the same text as --eval-text SAME2"),
    (["--recover-steps", "2", "--no-recover-here"],
     "--no-recover-here leaves recovery to the workers of a shared study: give --storage URL"),
])
def test_bad_recovery_input_is_one_line(capsys, tmp_path, tiny_model_dir, extra, match):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "same.txt").write_text("some prose " * 2000)
    (tmp_path / "same2.txt").write_text("some prose " * 2000 + "\n")
    files = {"EMPTY": str(tmp_path / "empty.txt"), "SAME": str(tmp_path / "same.txt"),
             "SAME2": str(tmp_path / "same2.txt")}
    extra = [files.get(a, a) for a in extra]
    for name, path in sorted(files.items(), key=lambda kv: -len(kv[0])):
        match = match.replace(name, path)
    code = main(["search", "--no-progress", "--model", str(tiny_model_dir), "--runs-dir",
                 str(tmp_path / "runs"), "--window", "64", "--eval-tokens", "256",
                 "--calib-tokens", "128", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("llmpareto: error:"), err
    assert match in err[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_keep_rule_vetoes_what_is_further_from_the_base_on_the_guard_text():
    from llmpareto.search.recover import vetoed

    assert vetoed(0.5, 0.4) == ""  # closer on held-out windows, no guard text
    assert vetoed(0.5, 0.5) == "holdout"  # no gain where it never learned
    assert vetoed(0.5, 0.4, 0.20, 0.19) == ""
    assert vetoed(0.5, 0.4, 0.20, 0.20) == ""  # no further on the guard text
    assert vetoed(0.5, 0.4, 0.20, 0.2001) == "guard"
    assert vetoed(0.5, 0.6, 0.20, 0.10) == "holdout"


def test_a_point_further_from_the_base_on_the_guard_text_keeps_its_weights(
        tiny_model_dir, tmp_path, monkeypatch):
    """The search consults the guard text: when every recovered weights' guard KL is worse
    than the weights a point has, no point keeps recovered weights and none are written."""
    from llmpareto.search import recover

    calls = []
    real = recover.Measure.guard_kl

    def worse_each_time(self):
        calls.append(real(self))  # the real guard windows, scored
        return float(len(calls))  # each call further from the base than the one before

    monkeypatch.setattr(recover.Measure, "guard_kl", worse_each_time)
    llmpareto.search(**_settings(tiny_model_dir, tmp_path, recover_steps=15,
                                 recover_tokens=1024, recover_rounds=1))
    t = pd.read_csv(tmp_path / "runs" / "r" / "trials.csv")
    tried = t[t["recover_steps"].notna() & (t["recover_method"] != "none")]
    assert len(tried) >= 2 and calls and all(np.isfinite(calls))
    assert not tried["recover_used"].astype(bool).any()
    # vetoed by the guard wherever the held-out windows alone would have kept them
    assert set(tried["recover_veto"]) <= {"guard", "holdout"} and "guard" in set(tried["recover_veto"])
    assert not list((tmp_path / "runs" / "r" / "recover").glob("*.safetensors"))


def test_recovery_on_a_run_whose_model_is_gone(capsys, tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    s = _settings(model, tmp_path, trials=3, recover_steps=0)
    llmpareto.search(**s)
    shutil.rmtree(model)
    db = tmp_path / "runs" / "r" / "study.db"
    before = db.read_bytes()
    capsys.readouterr()
    argv = ["search", "--no-progress", "--resume", "--recover-steps", "2"]
    for k, v in s.items():
        if k not in ("progress", "recover_steps"):
            argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmpareto: error:") and str(model) in err[0]
    assert db.read_bytes() == before


def test_a_point_keeps_its_post_training_weights_when_recovery_does_not_help(
        tiny_model_dir, tmp_path, monkeypatch):
    """Whatever a method returns, a point keeps it only when it is closer to the base model
    on held-out calibration windows: a method that wrecks the weights leaves the point as
    post-training made it (no weights file, no recovered columns, pick exports the trial)."""
    import torch

    from llmpareto.search import recover

    def wreck(bench, recipe, windows, steps, seed, progress, holdout=None, start=None):
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for fqn in bench.arch.formats_for(recipe):
            w = bench.cache.source(fqn).float()
            out[fqn] = w + torch.randn(w.shape, generator=gen) * w.std()
        return out, False

    real = recover.REGISTRY["reconstruct"]
    monkeypatch.setitem(recover.REGISTRY, "reconstruct",
                        recover.Method("reconstruct", "wrecks", real.handles, wreck))
    s = _settings(tiny_model_dir, tmp_path, formats="q4_0,f16", trials=2, recover_steps=2,
                  recover_rounds=2)
    llmpareto.search(**s)
    run = tmp_path / "runs" / "r"
    t = pd.read_csv(run / "trials.csv").set_index("baseline")
    row = t.loc["uniform q4_0"]
    assert row["recover_method"] == "reconstruct" and row["recover_steps"] == 2
    assert not bool(row["recover_used"]) and np.isfinite(row["recover_holdout_kl_nats"])
    assert all(pd.isna(row.get(c, np.nan)) for c in RECOVERED)
    assert not (run / "recover" / f"trial-{int(row['trial'])}.safetensors").exists()
    from llmpareto.front import effective

    tt = pd.read_csv(run / "trials.csv")
    eff = effective(tt, ["perplexity", "memory_bytes"])
    i = tt.index[tt["baseline"] == "uniform q4_0"][0]
    assert eff.loc[i, "perplexity"] == tt.loc[i, "perplexity"]
