"""Fault-suite kills: the CLI in subprocesses, SIGKILLed at a random moment of a search,
`pick` or `distill`, then resumed and counted."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmpareto.tests.faults.checks import (
    Outcome,
    account,
    check_run_dir,
    complete_trials,
    is_tmp,
    log,
    n_complete_fast,
)

CLI = [sys.executable, "-m", "llmpareto.cli"]
# tests/conftest.py's tiny_settings as flags: a search of ~25 s on 2 cores
FAST = {"window": 64, "eval_tokens": 128, "calib_tokens": 128, "context": 512,
        "formats": "f16,q8_0,q5_1,q5_0,q4_1,q4_0,tq2_0", "presets": "none"}
N_BASELINES = 7  # one uniform recipe per format in FAST["formats"]
PHASES = ("load", "prepare", "trial", "outputs", "end")


# --------------------------------------------------------------------------- subprocesses

def flags(settings: dict) -> list[str]:
    argv = []
    for k, v in settings.items():
        if isinstance(v, bool):
            argv.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
        else:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def search_argv(settings: dict, *extra: str) -> list[str]:
    return [*CLI, "search", "--no-progress", *flags(settings), *extra]


def run_cli(argv: list[str], timeout: float = 600, env: dict | None = None,
            preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=preexec_fn, check=False)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("llmpareto: error:")]


def clear_refusal(proc: subprocess.CompletedProcess) -> str | None:
    """None if the command failed with exit 2, one `llmpareto: error:` line and no traceback;
    else what was wrong."""
    errs = error_lines(proc.stderr)
    if "Traceback" in proc.stderr:
        return f"traceback (exit {proc.returncode}): {proc.stderr.strip()[-600:]}"
    if proc.returncode != 2 or len(errs) != 1:
        return (f"exit {proc.returncode}, {len(errs)} error line(s); stderr: "
                f"{proc.stderr.strip()[-400:]!r}; stdout: {proc.stdout.strip()[-200:]!r}")
    return None


ATTEMPTS = 4  # a kill that found its process already exited is retried this often, earlier
EARLIER = 0.3  # each retry aims this fraction of the previous try's delay


def sigkill(proc: subprocess.Popen) -> bool:
    """SIGKILL `proc` and reap it; True only if the signal is what ended it (the process was
    alive when it landed), False if it had exited on its own."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def snapshot(folder: Path, into: Path) -> Path | None:
    """A copy of `folder` (None if it does not exist) to restore before a retried kill."""
    shutil.rmtree(into, ignore_errors=True)
    if not folder.exists():
        return None
    shutil.copytree(folder, into, symlinks=True)
    return into


def restore(folder: Path, snap: Path | None) -> None:
    """Put `folder` back as `snapshot` found it (absent if it was)."""
    shutil.rmtree(folder, ignore_errors=True)
    if snap is not None:
        shutil.copytree(snap, folder, symlinks=True)


def missed(o: Outcome, tries: int, why: str) -> None:
    """The fault never landed: the outcome fails (a test that names a fault must see it)."""
    o.injected = False
    o.problems.append(f"the fault never landed in {tries} tries ({why}): nothing was tested")


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def observed_phase(run: Path, wanted: int) -> str:
    """Where a killed search was, judged from its files."""
    db = run / "study.db"
    n = n_complete_fast(db)
    if not (run / "run.json").exists():
        return "load"
    if n <= 0:
        return "prepare"
    if n < wanted:
        return "trial"
    return "outputs"


def _wait_kill(proc: subprocess.Popen, run: Path, phase: str, trials: int,
               rng: random.Random, deadline: float, scale: float = 1.0) -> tuple[str, bool]:
    """Sleep/poll until the kill moment of `phase`, then SIGKILL; returns what was aimed at and
    whether the signal landed on the live process. `scale` < 1 aims earlier (a retry).
    Phase "exited" (for the suite's own test) waits for the process to exit first: a no-op."""
    db, csv = run / "study.db", run / "trials.csv"

    def alive() -> bool:
        return proc.poll() is None and time.time() < deadline

    def hold(d: float) -> None:
        t0 = time.time()
        while alive() and time.time() - t0 < d:
            time.sleep(0.003)

    if phase == "exited":
        proc.wait()
        aim = "after the process exited"
    elif phase == "load":
        d = rng.uniform(0.2, 3.0) * scale
        hold(d)
        aim = f"{d:.2f}s after start"
    elif phase == "prepare":
        # after the run directory exists (model loaded): cache, imatrix, sensitivity profile,
        # study creation; half the time in the short window after study.db appears
        marker = db if rng.random() < 0.5 else run / "run.json"
        d = rng.uniform(0.0, 1.5 if marker == db else 12.0) * scale
        while alive() and not marker.exists():
            time.sleep(0.01)
        t0 = time.time()
        while alive() and time.time() - t0 < d and n_complete_fast(db) <= 0:
            time.sleep(0.01)
        aim = f"{d:.2f}s after {marker.name} appeared"
    elif phase == "trial":
        cur = max(n_complete_fast(db), 0)
        lo = min(cur + 1, trials - 1)
        k = lo + int((rng.randint(lo, trials - 1) - lo) * scale)
        d = rng.uniform(0.0, 0.4) * scale
        while alive() and n_complete_fast(db) < k:
            time.sleep(0.02)
        hold(d)
        aim = f"{d:.2f}s after {k} complete"
    elif phase == "outputs":
        # trials.csv and the front files are rewritten after every trial: after the k-th
        # trial's, kill within the time they take to write
        cur = max(n_complete_fast(db), 0)
        lo = min(cur + 1, trials - 1)
        k = lo + int((rng.randint(lo, trials - 1) - lo) * scale)
        d = rng.uniform(0.0, 0.05) * scale
        while alive() and n_complete_fast(db) < k:
            time.sleep(0.01)
        m0 = _mtime(csv)
        while alive() and _mtime(csv) == m0:
            time.sleep(0.002)
        hold(d)
        aim = f"{d:.3f}s after trials.csv was rewritten with {k} complete"
    elif phase == "end":
        d = rng.uniform(0.0, 2.5) * scale
        while alive() and n_complete_fast(db) < trials - 1:
            time.sleep(0.02)
        hold(d)
        aim = f"{d:.2f}s after {trials - 1} complete"
    else:
        raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")
    return aim, sigkill(proc)


def search_settings(model: Path, runs: Path, study: str, rng: random.Random, trials: int,
                    settings: dict | None = None) -> dict:
    return {"model": str(model), "runs_dir": str(runs), "study": study, "trials": trials,
            "seed": rng.randint(0, 10_000), **FAST, **(settings or {})}


def kill_chain(phases: list[str], model: Path, runs: Path, study: str, rng: random.Random,
               trials: int = 10, settings: dict | None = None, timeout: float = 300,
               attempts: int = ATTEMPTS) -> list[Outcome]:
    """Start `llmpareto search` and SIGKILL it at a random moment of `phases[0]`; `--resume`
    it and SIGKILL it at a random moment of `phases[1]`; ...; then `--resume` to completion.
    One Outcome per kill. A kill that finds the process already exited is no fault: the run
    directory is put back as it was before that start and the kill retried earlier, up to
    `attempts` times, after which the outcome fails. Checks: the kill landed, exit 0, `trials`
    COMPLETE, 0 completed trials lost (for each kill: the trials complete at that kill), 0
    duplicated (counted once, on the last kill), 0 half-written (after each kill and at the
    end), 0 temporaries left at the end."""
    s = search_settings(model, runs, study, rng, trials, settings)
    run = runs / study
    db = run / "study.db"
    kills = []
    for phase in phases:
        t0 = time.time()
        extra = ("--resume",) if run.exists() else ()
        snap = snapshot(run, runs / f".{study}.snapshot")
        scale = 1.0
        for attempt in range(1, attempts + 1):
            proc = subprocess.Popen(search_argv(s, *extra), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            aim, killed = _wait_kill(proc, run, phase, trials, rng, time.time() + timeout,
                                     scale)
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if killed or proc.returncode != 0 or attempt == attempts:
                break
            restore(run, snap)  # it finished first: the same start again, killed earlier
            scale *= EARLIER
        where = observed_phase(run, trials) if killed else f"exited (exit {proc.returncode})"
        o = Outcome(f"SIGKILL local search: {phase}",
                    f"{'resume, ' if extra else ''}{aim}; was in {where}"
                    + (f"; try {attempt}" if attempt > 1 else ""), injected=killed)
        if not killed:
            missed(o, attempt, f"the search had exited with {proc.returncode}")
        if not killed and proc.returncode != 0:
            o.problems.append(f"exit {proc.returncode} before the kill: {err[-600:]}")
        if "Traceback" in err:
            o.problems.append(f"traceback before the kill: {err[-400:]}")
        if snap is not None:
            shutil.rmtree(snap, ignore_errors=True)
        before = complete_trials(db, study)
        chk = check_run_dir(run)
        o.half_written = chk["half_written"]
        o.detail += f"; {len(before)} complete, {len(chk['leftover_tmp'])} tmp at the kill"
        o.seconds = time.time() - t0
        kills.append((o, before))
    t0 = time.time()
    res = run_cli(search_argv(s, "--resume"), timeout=timeout)
    final = check_run_dir(run)
    for i, (o, before) in enumerate(kills):
        o.completed = res.returncode == 0
        if not o.completed:
            o.problems.append(f"resume exit {res.returncode}: {res.stderr.strip()[-800:]}")
        elif "Traceback" in res.stderr:
            o.problems.append("traceback in the resume's stderr")
        acc = account(db, study, before, run / "trials.csv", trials)
        o.lost = acc["lost"]
        if i == len(kills) - 1:
            o.duplicated = acc["duplicated"]
            o.half_written += final["half_written"]
            o.leftover_tmp = final["leftover_tmp"]
            if acc["complete"] != trials:
                o.problems.append(f"{acc['complete']} complete trials, wanted {trials}")
            if acc["csv_problem"]:
                o.problems.append(acc["csv_problem"])
            if acc["baselines"] != N_BASELINES:
                o.problems.append(f"{acc['baselines']} baselines, wanted {N_BASELINES}")
            o.seconds += time.time() - t0
        log(o.line())
    return [o for o, _ in kills]


def kill_at(phase: str, model: Path, runs: Path, study: str, rng: random.Random,
            trials: int = 10, settings: dict | None = None, timeout: float = 300) -> Outcome:
    """Start `llmpareto search`, SIGKILL it at a random moment of `phase` (one of PHASES),
    then `--resume` it to completion; see kill_chain for what is checked."""
    return kill_chain([phase], model, runs, study, rng, trials, settings, timeout)[0]


# ---------------------------------------------------------------------- pick and distill

def front_trial(run: Path) -> int:
    import pandas as pd

    df = pd.read_csv(run / "front.csv")
    return int(df["trial"].iloc[0])


def export_complete(out: Path) -> str | None:
    """None if a `pick` export folder is whole (recipe, card, GGUF and hf/ all readable)."""
    if not out.is_dir():
        return "absent"
    need = [out / "recipe.json", out / "README.md", out / "model.gguf", out / "hf"]
    missing = [p.name for p in need if not p.exists()]
    if missing:
        return f"missing {missing}"
    if not list((out / "hf").glob("*.safetensors")) or not (out / "hf" / "config.json").exists():
        return "hf/ has no config.json or safetensors"
    bad = check_run_dir(out)["half_written"]
    return f"unreadable {bad}" if bad else None


def kill_pick(run: Path, outdir: Path, rng: random.Random, timeout: float = 300,
              attempts: int = ATTEMPTS) -> Outcome:
    """SIGKILL `llmpareto pick` at a random moment while it runs (retried earlier, on a clean
    folder, when it had finished first); the folder must then be absent or whole, and a second
    `pick` (with --force when the first left a folder) must complete it."""
    t0 = time.time()
    trial = front_trial(run)
    argv = [*CLI, "pick", str(run), "--trial", str(trial), "--out", str(outdir)]
    hi = 9.0
    for attempt in range(1, attempts + 1):
        shutil.rmtree(outdir, ignore_errors=True)
        start = time.time()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        d = rng.uniform(0.3, hi) if attempt < attempts else rng.uniform(0.0, 0.3)
        while proc.poll() is None and time.time() - start < d:
            time.sleep(0.01)
        killed = sigkill(proc)
        if killed:
            break
        hi = max(0.3, min(hi, time.time() - start) * EARLIER * 2)
    o = Outcome("SIGKILL pick", f"{d:.2f}s after start"
                + (f"; try {attempt}" if attempt > 1 else ""), injected=killed)
    if not killed:
        missed(o, attempt, f"pick had exited with {proc.returncode}")
    state = export_complete(outdir)
    if state not in (None, "absent"):
        o.half_written.append((str(outdir), state))
    res = run_cli(argv, timeout=timeout)
    if res.returncode != 0:
        if state is None and "--force" in res.stderr and res.returncode == 2:
            res = run_cli([*argv, "--force"], timeout=timeout)
        else:
            o.problems.append(f"second pick exit {res.returncode}: {res.stderr[-500:]}")
    if "Traceback" in res.stderr:
        o.problems.append(f"traceback: {res.stderr[-500:]}")
    o.completed = res.returncode == 0 and export_complete(outdir) is None
    if not o.completed:
        o.problems.append(f"export after re-run: {export_complete(outdir)}; "
                          f"{res.stderr.strip()[-300:]}")
    beside = [*outdir.parent.glob(outdir.name + "*"), *outdir.parent.glob(f".{outdir.name}.*")]
    o.leftover_tmp = [str(p) for p in beside if is_tmp(p.name)]
    o.leftover_tmp += check_run_dir(outdir)["leftover_tmp"]
    o.seconds = time.time() - t0
    log(o.line())
    return o


def kill_distill(run: Path, rng: random.Random, steps: int = 30, every: int = 3,
                 timeout: float = 300, attempts: int = ATTEMPTS) -> Outcome:
    """SIGKILL `llmpareto distill` after a checkpoint was written, while it still runs (retried
    earlier, from a copy of the run as it was, when it had finished first); the re-run must say
    "resumed at" and finish; the run directory must stay whole."""
    t0 = time.time()
    trial = front_trial(run)
    ck = run / "distill" / f"trial-{trial}" / "checkpoint.pt"
    argv = [*CLI, "distill", str(run), "--trial", str(trial), "--steps", str(steps),
            "--checkpoint-every", str(every), "--batch-size", "1", "--no-progress"]
    snap = snapshot(run, run.parent / f".{run.name}.snapshot")
    hi = 1.0
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and not ck.exists() and time.time() - t0 < timeout:
            time.sleep(0.002)
        d = rng.uniform(0.0, hi)
        t1 = time.time()
        while proc.poll() is None and time.time() - t1 < d:
            time.sleep(0.002)
        killed = sigkill(proc)
        if killed or attempt == attempts:
            break
        restore(run, snap)
        hi *= EARLIER
    shutil.rmtree(snap, ignore_errors=True)
    o = Outcome("SIGKILL distill", f"{d:.3f}s after the first checkpoint"
                + (f"; try {attempt}" if attempt > 1 else ""), injected=killed)
    if not killed:
        missed(o, attempt, f"distill had exited with {proc.returncode}")
    o.half_written = check_run_dir(run)["half_written"]
    res = run_cli(argv, timeout=timeout)
    m = re.search(r"resumed at (\d+)", res.stdout)
    o.completed = res.returncode == 0
    if not o.completed:
        o.problems.append(f"re-run exit {res.returncode}: {res.stderr.strip()[-500:]}")
    elif killed and not m:
        o.problems.append(f"the re-run did not resume: {res.stdout.strip()[-300:]}")
    else:
        o.detail += f"; resumed at {m.group(1) if m else '-'}"
    import pandas as pd

    df = pd.read_csv(run / "trials.csv")
    if o.completed and not (df.loc[df["trial"] == trial, "distill_steps"] == steps).all():
        o.problems.append("trials.csv does not record the distillation")
    final = check_run_dir(run)
    o.half_written += final["half_written"]
    o.leftover_tmp = final["leftover_tmp"]
    o.seconds = time.time() - t0
    log(o.line())
    return o


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random Llama (llmpareto.tiny), built once in `folder`."""
    from llmpareto.tiny import build_tiny_model

    if not (folder / "config.json").exists():
        build_tiny_model(folder)
    return folder
