"""Fault injection for llmpareto (issue 15): the real CLI in subprocesses, SIGKILLed at random
moments, run out of disk, fed damaged files; then counted.

Importable by the pytest suite (tests/faults/test_faults.py) and by the benchmark
(`python3 -m llmpareto.bench.bench_faults`) as `llmpareto.tests.faults.harness`.

The checks here are independent of llmpareto: a run directory is judged with sqlite3, json,
pandas, gguf, safetensors and torch, never with llmpareto's own readers.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "llmpareto.cli"]
# tests/conftest.py's tiny_settings as flags: a search of ~25 s on 2 cores
FAST = {"window": 64, "eval_tokens": 128, "calib_tokens": 128, "context": 512,
        "formats": "f16,q8_0,q5_1,q5_0,q4_1,q4_0,tq2_0", "presets": "none"}
N_BASELINES = 7  # one uniform recipe per format in FAST["formats"]
PHASES = ("load", "prepare", "trial", "outputs", "end")
PNG_SIG = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TMP_NAME = re.compile(r"(^\..*\.tmp$)|(\.tmp$)|(\.partial$)")


def log(msg: str) -> None:
    print(f"[faults] {msg}", flush=True)


# ----------------------------------------------------------------------------- the checker

def _is_tmp(name: str) -> bool:
    """A temporary: `.<name>.<pid>.<rand>.tmp` (llmpareto.atomic), any other `*.tmp`, or an
    export's `<out>.partial` folder. Leftovers, never counted as half-written outputs."""
    return bool(_TMP_NAME.search(name))


def _check_file(p: Path) -> str | None:
    """None if `p` is a whole file of its kind, else why not."""
    suffix = p.suffix.lower()
    try:
        if p.name == "study.db" or suffix == ".db":
            con = sqlite3.connect(str(p), timeout=30)
            try:
                res = con.execute("PRAGMA integrity_check").fetchall()
            finally:
                con.close()
            return None if res == [("ok",)] else f"integrity_check: {res[:3]}"
        if suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
        elif suffix == ".csv":
            import pandas as pd

            df = pd.read_csv(p)
            if len(df.columns) == 0:
                return "no header"
        elif suffix == ".png":
            data = p.read_bytes()
            if not data.startswith(PNG_SIG) or not data.endswith(PNG_END):
                return "no PNG signature or no IEND chunk at the end"
        elif suffix == ".gguf":
            import gguf

            r = gguf.GGUFReader(str(p))
            size = p.stat().st_size
            for t in r.tensors:
                if t.data_offset + t.n_bytes > size:
                    return f"tensor {t.name} runs past the end of the file"
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open is not iterable
                    fh.get_tensor(k)
        elif suffix == ".pt":
            import torch

            torch.load(p, weights_only=True)
        elif suffix == ".toml":
            import tomllib

            tomllib.loads(p.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any failure to read is what we count
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def check_run_dir(path: str | Path, skip: tuple[str, ...] = ("ray",)) -> dict:
    """Judge every file under a run directory (or an export folder) without llmpareto's code.

    study.db: PRAGMA integrity_check; *.json parse; *.csv parse with a header; *.png have the
    signature and end with IEND; *.gguf open in the gguf package with every tensor inside the
    file; *.safetensors and *.pt load. Temporaries (`.*.tmp`, `*.tmp`, `*.partial`) are
    leftovers, not half-written outputs. `skip`: top-level folders not written by llmpareto
    (Ray Tune's `ray/`). Returns {"files", "half_written": [(path, why)], "leftover_tmp"}."""
    root = Path(path)
    out = {"files": 0, "half_written": [], "leftover_tmp": []}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts and rel.parts[0] in skip:
            dirnames[:] = []
            continue
        for d in list(dirnames):
            if _is_tmp(d):
                out["leftover_tmp"].append(str(Path(dirpath) / d))
                dirnames.remove(d)
        for name in filenames:
            p = Path(dirpath) / name
            if _is_tmp(name):
                out["leftover_tmp"].append(str(p))
                continue
            if name.endswith(("-journal", "-wal", "-shm")):  # SQLite's own
                continue
            out["files"] += 1
            why = _check_file(p)
            if why:
                out["half_written"].append((str(p), why))
    return out


def permission_problems(path: str | Path) -> list[str]:
    """Files under `path` whose permissions are not what the umask gives a new file (0644 under
    umask 022): a temporary made with mkstemp is 0600 and keeps that mode when renamed."""
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    bad = []
    for p in Path(path).rglob("*"):
        if p.is_file() and not _is_tmp(p.name) and (p.stat().st_mode & 0o777) != want:
            bad.append(f"{p.relative_to(path)} {oct(p.stat().st_mode & 0o777)}")
    return sorted(bad)


# ----------------------------------------------------------------------- trial accounting

def complete_trials(db: Path, study: str) -> dict[int, tuple]:
    """COMPLETE trials in `db` (a path or a storage URL): number -> (values, params)."""
    return {n: (v, p) for n, (v, p, _) in trial_records(db, study).items()}


def trial_records(storage: Path | str, study: str) -> dict[int, tuple]:
    """number -> (values, params, user_attrs) of the COMPLETE trials (read with optuna)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if isinstance(storage, str) and "://" in storage:
        s = optuna.load_study(study_name=study, storage=read_url(storage))
    else:
        try:
            s = optuna.load_study(study_name=study, storage=f"sqlite:///{storage}")
        except Exception:  # noqa: BLE001 - not created yet, or unreadable
            return {}
    return {t.number: (t.values, t.params, dict(t.user_attrs))
            for t in s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def read_url(url: str) -> str:
    """A PostgreSQL URL with the driver that is installed (SQLAlchemy 2.1 maps postgresql://
    to psycopg 3, 2.0 to psycopg2)."""
    import importlib.util

    if url.startswith("postgresql://"):
        for module, driver in (("psycopg", "postgresql+psycopg"),
                               ("psycopg2", "postgresql+psycopg2")):
            if importlib.util.find_spec(module) is not None:
                return driver + url[len("postgresql"):]
    return url


def n_complete_fast(db: Path) -> int:
    """COMPLETE trials in a SQLite study.db, read with sqlite3 (cheap enough to poll)."""
    if not db.exists():
        return -1
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            return con.execute("SELECT count(*) FROM trials WHERE state='COMPLETE'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def account(storage, study: str, before: dict, trials_csv: Path | None, wanted: int) -> dict:
    """lost: completed before the fault, missing or changed after; duplicated: a baseline or
    seed label completed more than once, plus trials.csv rows that are not the study's trials
    exactly once each."""
    after = trial_records(storage, study)
    lost = sum(1 for n, v in before.items() if n not in after or after[n][:2] != v)
    labels = Counter()
    for _, _, attrs in after.values():
        for key in ("baseline", "seed"):
            if attrs.get(key):
                labels[(key, attrs[key])] += 1
    dup = sum(c - 1 for c in labels.values() if c > 1)
    csv_problem = None
    if trials_csv is not None:
        import pandas as pd

        try:
            df = pd.read_csv(trials_csv)
            nums = list(df["trial"])
            extra = len(nums) - len(set(nums))
            dup += extra
            if extra or not set(after) <= set(nums):
                csv_problem = (f"trials.csv: {extra} repeated trial numbers, "
                               f"{len(set(after) - set(nums))} complete trials missing")
        except Exception as exc:  # noqa: BLE001
            csv_problem = f"trials.csv unreadable: {exc}"
    return {"complete": len(after), "wanted": wanted, "lost": lost, "duplicated": dup,
            "baselines": sum(1 for k in labels if k[0] == "baseline"), "csv_problem": csv_problem}


# ------------------------------------------------------------------------------- outcomes

@dataclass
class Outcome:
    fault: str
    detail: str = ""
    completed: bool = False
    lost: int = 0
    duplicated: int = 0
    half_written: list = field(default_factory=list)
    leftover_tmp: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.completed and not self.lost and not self.duplicated
                and not self.half_written and not self.problems)

    def line(self) -> str:
        return (f"{self.fault} [{self.detail}]: completed={self.completed} lost={self.lost} "
                f"duplicated={self.duplicated} half_written={len(self.half_written)} "
                f"leftover_tmp={len(self.leftover_tmp)} ({self.seconds:.0f} s)"
                + (f" problems={self.problems}" if self.problems else "")
                + (f" half={self.half_written}" if self.half_written else ""))


def summarize(outcomes: list[Outcome]) -> list[dict]:
    rows: dict[str, dict] = {}
    for o in outcomes:
        r = rows.setdefault(o.fault, {"fault": o.fault, "tried": 0, "completed": 0, "lost": 0,
                                      "duplicated": 0, "half_written": 0, "leftover_tmp": 0})
        r["tried"] += 1
        r["completed"] += int(o.completed)
        r["lost"] += o.lost
        r["duplicated"] += o.duplicated
        r["half_written"] += len(o.half_written)
        r["leftover_tmp"] += len(o.leftover_tmp)
    return list(rows.values())


def table(outcomes: list[Outcome]) -> str:
    head = ("fault injected", "times tried", "completed after resume", "completed trials lost",
            "trials duplicated", "files left half-written", "leftover temporaries")
    rows = [(r["fault"], r["tried"], r["completed"], r["lost"], r["duplicated"],
             r["half_written"], r["leftover_tmp"]) for r in summarize(outcomes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


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


def _sigkill(proc: subprocess.Popen) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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
               rng: random.Random, deadline: float) -> str:
    """Sleep/poll until the kill moment of `phase`, then SIGKILL; returns what was aimed at."""
    db, csv = run / "study.db", run / "trials.csv"

    def alive() -> bool:
        return proc.poll() is None and time.time() < deadline

    def hold(d: float) -> None:
        t0 = time.time()
        while alive() and time.time() - t0 < d:
            time.sleep(0.003)

    if phase == "load":
        d = rng.uniform(0.2, 3.0)
        hold(d)
        aim = f"{d:.2f}s after start"
    elif phase == "prepare":
        # after the run directory exists (model loaded): cache, imatrix, sensitivity profile,
        # study creation; half the time in the short window after study.db appears
        marker = db if rng.random() < 0.5 else run / "run.json"
        d = rng.uniform(0.0, 1.5 if marker == db else 12.0)
        while alive() and not marker.exists():
            time.sleep(0.01)
        t0 = time.time()
        while alive() and time.time() - t0 < d and n_complete_fast(db) <= 0:
            time.sleep(0.01)
        aim = f"{d:.2f}s after {marker.name} appeared"
    elif phase == "trial":
        cur = max(n_complete_fast(db), 0)
        k = rng.randint(min(cur + 1, trials - 1), trials - 1)
        d = rng.uniform(0.0, 0.4)
        while alive() and n_complete_fast(db) < k:
            time.sleep(0.02)
        hold(d)
        aim = f"{d:.2f}s after {k} complete"
    elif phase == "outputs":
        m0 = _mtime(csv)
        d = rng.uniform(0.0, 1.2)
        while alive() and _mtime(csv) == m0:
            time.sleep(0.002)
        hold(d)
        aim = f"{d:.2f}s after trials.csv changed"
    elif phase == "end":
        d = rng.uniform(0.0, 2.5)
        while alive() and n_complete_fast(db) < trials - 1:
            time.sleep(0.02)
        hold(d)
        aim = f"{d:.2f}s after {trials - 1} complete"
    else:
        raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")
    _sigkill(proc)
    return aim


def search_settings(model: Path, runs: Path, study: str, rng: random.Random, trials: int,
                    settings: dict | None = None) -> dict:
    return {"model": str(model), "runs_dir": str(runs), "study": study, "trials": trials,
            "seed": rng.randint(0, 10_000), **FAST, **(settings or {})}


def kill_chain(phases: list[str], model: Path, runs: Path, study: str, rng: random.Random,
               trials: int = 10, settings: dict | None = None,
               timeout: float = 300) -> list[Outcome]:
    """Start `llmpareto search` and SIGKILL it at a random moment of `phases[0]`; `--resume`
    it and SIGKILL it at a random moment of `phases[1]`; ...; then `--resume` to completion.
    One Outcome per kill. Checks: exit 0, `trials` COMPLETE, 0 completed trials lost (for
    each kill: the trials complete at that kill), 0 duplicated (counted once, on the last
    kill), 0 half-written (after each kill and at the end); leftover temporaries reported."""
    s = search_settings(model, runs, study, rng, trials, settings)
    run = runs / study
    db = run / "study.db"
    kills = []
    for phase in phases:
        t0 = time.time()
        extra = ("--resume",) if run.exists() else ()
        proc = subprocess.Popen(search_argv(s, *extra), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        aim = _wait_kill(proc, run, phase, trials, rng, time.time() + timeout)
        killed = proc.returncode == -signal.SIGKILL
        where = observed_phase(run, trials) if killed else f"finished (exit {proc.returncode})"
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        o = Outcome(f"SIGKILL local search: {phase}",
                    f"{'resume, ' if extra else ''}{aim}; was in {where}")
        if not killed and proc.returncode != 0:
            o.problems.append(f"exit {proc.returncode} before the kill: {err[-600:]}")
        if "Traceback" in err:
            o.problems.append(f"traceback before the kill: {err[-400:]}")
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


def kill_pick(run: Path, outdir: Path, rng: random.Random, timeout: float = 300) -> Outcome:
    """SIGKILL `llmpareto pick` at a random moment; the folder must then be absent or whole,
    and a second `pick` (with --force when the first left a folder) must complete it."""
    t0 = time.time()
    trial = front_trial(run)
    argv = [*CLI, "pick", str(run), "--trial", str(trial), "--out", str(outdir)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    d = rng.uniform(0.3, 9.0)
    while proc.poll() is None and time.time() - t0 < d:
        time.sleep(0.01)
    finished = proc.poll() is not None
    _sigkill(proc)
    o = Outcome("SIGKILL pick", f"{d:.2f}s after start" + (" (had finished)" if finished else ""))
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
    o.leftover_tmp = [str(p) for p in outdir.parent.glob(outdir.name + "*") if _is_tmp(p.name)]
    o.leftover_tmp += check_run_dir(outdir)["leftover_tmp"]
    o.seconds = time.time() - t0
    log(o.line())
    return o


def kill_distill(run: Path, rng: random.Random, steps: int = 30, every: int = 3,
                 timeout: float = 300) -> Outcome:
    """SIGKILL `llmpareto distill` after a checkpoint was written; the re-run must say
    "resumed at" and finish; the run directory must stay whole."""
    t0 = time.time()
    trial = front_trial(run)
    ck = run / "distill" / f"trial-{trial}" / "checkpoint.pt"
    argv = [*CLI, "distill", str(run), "--trial", str(trial), "--steps", str(steps),
            "--checkpoint-every", str(every), "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and not ck.exists() and time.time() - t0 < timeout:
        time.sleep(0.005)
    d = rng.uniform(0.0, 1.0)
    t1 = time.time()
    while proc.poll() is None and time.time() - t1 < d:
        time.sleep(0.005)
    finished = proc.poll() is not None
    _sigkill(proc)
    o = Outcome("SIGKILL distill", f"{d:.2f}s after the first checkpoint"
                + (" (had finished)" if finished else ""))
    o.half_written = check_run_dir(run)["half_written"]
    res = run_cli(argv, timeout=timeout)
    m = re.search(r"resumed at (\d+)", res.stdout)
    o.completed = res.returncode == 0
    if not o.completed:
        o.problems.append(f"re-run exit {res.returncode}: {res.stderr.strip()[-500:]}")
    elif not finished and not m:
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


# ----------------------------------------------------------------------------- disk full

def tmpfs_works(where: Path) -> bool:
    """Whether this user may mount a small tmpfs (root in most containers; not everywhere)."""
    d = where / "tmpfs-probe"
    d.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                        capture_output=True, check=False).returncode == 0 \
        if shutil.which("mount") else False
    if ok:
        subprocess.run(["umount", str(d)], capture_output=True, check=False)
    shutil.rmtree(d, ignore_errors=True)
    return ok


# KiB at which the run directory fills: early (before or at study creation), during the
# trials, late (outputs). A new study.db is 112 KiB and ~135 KiB after 10 trials; a tmpfs
# also holds run.json, the profile, the imatrix, recipes and outputs (~250 KiB in all).
# RLIMIT_FSIZE limits one file (study.db is the largest), so its late band is its middle one.
DISK_BANDS = {"tmpfs": [(40, 140), (150, 200), (200, 260)],
              "rlimit": [(40, 110), (114, 134), (114, 134)]}


def _fsize_limit(n: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return apply


def disk_full(model: Path, work: Path, study: str, size: int, rng: random.Random,
              mode: str = "auto", trials: int = 8, timeout: float = 300) -> Outcome:
    """A search whose run directory fills up at `size` bytes: a tmpfs of that size where this
    user may mount one (mode "tmpfs"), else RLIMIT_FSIZE in the child (mode "rlimit": any
    write past `size` bytes of one file fails with EFBIG). The run must stop with exit != 0,
    one `llmpareto: error:` line and no traceback, leave no half-written file, and `--resume`
    without the limit must complete with no completed trial lost."""
    t0 = time.time()
    if mode == "auto":
        mode = "tmpfs" if tmpfs_works(work) else "rlimit"
    runs = work / f"disk-{study}"
    runs.mkdir(parents=True, exist_ok=True)
    s = {"model": str(model), "runs_dir": str(runs), "study": study, "trials": trials,
         "seed": rng.randint(0, 10_000), **FAST}
    o = Outcome(f"disk full ({mode})", f"{size // 1024} KiB")
    mounted = False
    try:
        if mode == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(runs)],
                           check=True, capture_output=True)
            mounted = True
            res = run_cli(search_argv(s), timeout=timeout)
        else:
            res = run_cli(search_argv(s), timeout=timeout, preexec_fn=_fsize_limit(size))
        run, db = runs / study, runs / study / "study.db"
        errs = error_lines(res.stderr)
        if res.returncode == 0:
            o.detail += "; the limit was never hit"
        else:
            o.detail += f"; exit {res.returncode}: {(errs or ['(no error line)'])[-1][:160]}"
            if "Traceback" in res.stderr:
                o.problems.append(f"traceback: {res.stderr.strip()[-700:]}")
            elif len(errs) != 1:
                o.problems.append(f"{len(errs)} error lines: {res.stderr.strip()[-500:]}")
        before = complete_trials(db, study)
        after_fail = check_run_dir(run)
        if mounted:  # more room, same files
            subprocess.run(["mount", "-o", "remount,size=256m", str(runs)], check=True,
                           capture_output=True)
        res2 = run_cli(search_argv(s, "--resume") if run.exists() else search_argv(s),
                       timeout=timeout)
        o.completed = res2.returncode == 0
        if not o.completed:
            o.problems.append(f"resume exit {res2.returncode}: {res2.stderr.strip()[-600:]}")
        acc = account(db, study, before, run / "trials.csv", trials)
        o.lost, o.duplicated = acc["lost"], acc["duplicated"]
        if acc["complete"] != trials:
            o.problems.append(f"{acc['complete']} complete after resume, wanted {trials}")
        final = check_run_dir(run)
        o.half_written = after_fail["half_written"] + final["half_written"]
        o.leftover_tmp = final["leftover_tmp"]
        o.detail += f"; {len(before)} complete when it stopped"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(runs)], capture_output=True, check=False)
    o.seconds = time.time() - t0
    log(o.line())
    return o


# ------------------------------------------------------------------------ damaged inputs

def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def damage_study_db(run_settings: dict, kind: str, rng: random.Random) -> Outcome:
    """Truncate ("truncated") or flip bytes inside ("flipped") a finished run's study.db, then
    `--resume` with the run's own settings (and 2 more trials): a clear refusal naming the
    file, no traceback, the damaged file untouched."""
    runs, study = Path(run_settings["runs_dir"]), run_settings["study"]
    db = runs / study / "study.db"
    data = bytearray(db.read_bytes())
    if kind == "truncated":
        cut = rng.randint(len(data) // 8, len(data) * 3 // 4)
        data = data[:cut]
        what = f"cut to {cut} of {db.stat().st_size} bytes"
    else:  # flip the b-tree header of one page after the first: what SQLite can detect
        # (a flip inside a record's payload passes PRAGMA integrity_check: nothing can tell)
        page = int.from_bytes(data[16:18], "big") or 65536
        n = rng.randint(1, len(data) // page - 1)
        for i in range(n * page, n * page + 16):
            data[i] ^= 0xFF
        what = f"16 bytes flipped at the start of page {n + 1} of {len(data) // page}"
    db.write_bytes(bytes(data))
    for side in ("study.db-journal", "study.db-wal"):
        (db.parent / side).unlink(missing_ok=True)
    digest = sha256(db)
    o = Outcome(f"damaged study.db ({kind})", what)
    if not _check_file(db):
        o.problems.append("the damage passes PRAGMA integrity_check: not a usable test case")
    t0 = time.time()
    res = run_cli(search_argv({**run_settings, "trials": run_settings["trials"] + 2},
                              "--resume"), timeout=300)
    o.seconds = time.time() - t0
    bad = clear_refusal(res)
    if bad:
        o.problems.append(bad)
    elif "study.db" not in res.stderr:
        o.problems.append(f"the message does not name study.db: {error_lines(res.stderr)}")
    if sha256(db) != digest:
        o.problems.append("the damaged study.db was modified")
    o.completed = not o.problems  # here: refused cleanly
    o.detail += "; " + (error_lines(res.stderr) or [res.stderr.strip()[-200:]])[-1][:220]
    log(o.line())
    return o


def damage_gguf(src: Path, dst: Path, kind: str) -> str:
    """Write a damaged copy of GGUF `src`: "truncated" (half the file), "tensor-count" (the
    header claims 2^40 tensors) or "huge-shape" (the first tensor claims 2^40 x ... elements)."""
    import gguf
    import numpy as np

    data = bytearray(src.read_bytes())
    if kind == "truncated":
        data = data[: len(data) // 2]
        what = f"cut to {len(data)} bytes"
    elif kind == "tensor-count":
        data[8:16] = np.uint64(2**40).tobytes()
        what = "n_tensors = 2^40"
    elif kind == "huge-shape":
        t = gguf.GGUFReader(str(src)).tensors[0]
        f = t.field  # parts: name length, name, n_dims, dims, type, offset
        at = f.offset + 8 + int(f.parts[0][0]) + 4
        data[at:at + 8] = np.uint64(2**40).tobytes()
        what = f"tensor {t.name} dim 0 = 2^40"
    else:
        raise ValueError(kind)
    dst.write_bytes(bytes(data))
    return what


def refuse(fault: str, what: str, argv: list[str], must_name: str | None = None,
           timeout: float = 300) -> Outcome:
    """Run `argv`, which must be refused clearly (exit 2, one error line, no traceback)."""
    t0 = time.time()
    res = run_cli(argv, timeout=timeout)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    o = Outcome(fault, what)
    o.seconds = time.time() - t0
    bad = clear_refusal(res)
    if bad:
        o.problems.append(bad)
    elif must_name and must_name not in res.stderr:
        o.problems.append(f"the message does not name {must_name!r}: {error_lines(res.stderr)}")
    o.completed = not o.problems
    o.detail += (f"; max child RSS so far {rss} MB; "
                 + (error_lines(res.stderr) or [res.stderr.strip()[-300:]])[-1][:300])
    log(o.line())
    return o


BAD_RECIPES = {
    "unknown top-level key": {"version": 1, "modules": {}, "structure": {}, "extra": 1},
    "unknown module key": {"version": 1, "modules": {"_default": {"format": "q4_0",
                                                                  "bits": 4}}},
    "format q9_9": {"version": 1, "modules": {"_default": {"format": "q9_9"}}},
    "sparsity 1.5": {"version": 1, "modules": {"_default": {"format": "f16", "sparsity": 1.5}}},
    "sparsity 'half'": {"version": 1, "modules": {"_default": {"sparsity": "half"}}},
    "modules a list": {"version": 1, "modules": ["q4_0"]},
    "structure layers -3": {"version": 1, "modules": {}, "structure": {"layers": -3}},
    "version 'one'": {"version": "one", "modules": {}},
}


def bad_recipe(model: Path, work: Path, name: str) -> Outcome:
    p = work / f"recipe-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.json"
    p.write_text(json.dumps(BAD_RECIPES[name]))
    return refuse(f"recipe JSON: {name}", p.name,
                  [*CLI, "cost", "--model", str(model), "--device", "raspberry-pi-5",
                   "--recipe", str(p)], must_name=None)


WRONG_UNITS = {  # field -> a value in the wrong unit
    "bandwidth_Bps": ("17.07", "GB/s written as B/s"),
    "memory_bytes": ("8", "GB written as bytes"),
    "power_active_w": ("11500.0", "mW written as W"),
}


def wrong_units_profile(work: Path, key: str) -> Path:
    import llmpareto.device_profiles as dp

    src = Path(dp.__file__).parent / "raspberry-pi-5.toml"
    value = WRONG_UNITS[key][0]
    text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", src.read_text())
    p = work / f"pi5-wrong-{key}.toml"
    p.write_text(text)
    return p


def wrong_units(model: Path, work: Path, key: str) -> Outcome:
    p = wrong_units_profile(work, key)
    return refuse(f"device profile wrong units: {key}",
                  f"{key} = {WRONG_UNITS[key][0]} ({WRONG_UNITS[key][1]})",
                  [*CLI, "cost", "--model", str(model), "--device", str(p), "--format",
                   "q4_0"], must_name=key)


# ------------------------------------------------------------------ PostgreSQL (RDB) server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SkipFault(Exception):
    """A fault that cannot be injected here (no Ray, no PostgreSQL): the reason says why."""


def pg_bindir() -> Path:
    """PostgreSQL server binaries, installed with apt-get when missing and we are root (as in
    tests/test_distributed_rdb.py)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], env=env,
                       capture_output=True, check=False)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise SkipFault("no PostgreSQL server binaries and no apt-get to install them")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise SkipFault("psycopg2 is not installed (pip install 'llmpareto[postgres]')") from None
    return Path(found[-1]).parent


class PgServer:
    """A throwaway PostgreSQL server on 127.0.0.1 (data in a temp dir); `stop()` removes it."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="llmpareto-faults-pg-"))
        self.data, self.port = self.root / "data", free_port()
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_pg:
            shutil.chown(self.root, "postgres")
        subprocess.run([*self.as_pg, str(self.bindir / "initdb"), "-D", str(self.data), "-U",
                        "postgres", "--auth=trust", "-E", "UTF8"], check=True,
                       capture_output=True)
        subprocess.run([*self.as_pg, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                        str(self.root / "log"), "-o",
                        f"-h 127.0.0.1 -p {self.port} -k {self.root}", "-w", "start"],
                       check=True, capture_output=True)
        self.dbs = 0

    def new_db(self) -> str:
        self.dbs += 1
        name = f"faults{self.dbs}"
        subprocess.run([*self.as_pg, str(self.bindir / "psql"), "-h", "127.0.0.1", "-p",
                        str(self.port), "-U", "postgres", "-c", f"CREATE DATABASE {name}"],
                       check=True, capture_output=True)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self.as_pg, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                        "fast", "-w", "stop"], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def kill_rdb_worker(pg: PgServer, model: Path, work: Path, study: str, rng: random.Random,
                    trials: int = 10, timeout: float = 400) -> Outcome:
    """Create a shared study, start `llmpareto worker`, SIGKILL it at a random moment (while
    it loads, or after k complete trials), then run another worker to completion."""
    t0 = time.time()
    url = pg.new_db()
    s = {"model": str(model), "runs_dir": str(work / f"{study}-creator"), "study": study,
         "trials": trials, "seed": rng.randint(0, 10_000), **FAST}
    res = run_cli(search_argv(s, "--storage", url, "--create-only"), timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"--create-only failed: {res.stderr[-1500:]}")

    def worker(i: int) -> list[str]:
        return [*CLI, "worker", "--study", study, "--storage", url, "--runs-dir",
                str(work / f"{study}-w{i}"), "--no-progress"]

    proc = subprocess.Popen(worker(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if rng.random() < 0.25:
        d = rng.uniform(0.5, 6.0)
        time.sleep(d)
        aim = f"{d:.1f}s after start"
    else:
        k = rng.randint(1, trials - 1)
        d = rng.uniform(0.0, 0.3)
        while proc.poll() is None and len(complete_trials(url, study)) < k \
                and time.time() - t0 < timeout:
            time.sleep(0.1)
        time.sleep(d)
        aim = f"{d:.2f}s after {k} complete"
    finished = proc.poll() is not None
    _sigkill(proc)
    before = complete_trials(url, study)
    o = Outcome("SIGKILL RDB worker", f"{aim}; {len(before)} complete at the kill"
                + (" (had finished)" if finished else ""))
    res = run_cli(worker(2), timeout=timeout)
    o.completed = res.returncode == 0
    if not o.completed:
        o.problems.append(f"second worker exit {res.returncode}: {res.stderr[-800:]}")
    if "Traceback" in res.stderr:
        o.problems.append("traceback in the second worker's stderr")
    run2 = work / f"{study}-w2" / study
    acc = account(url, study, before, run2 / "trials.csv", trials)
    o.lost, o.duplicated = acc["lost"], acc["duplicated"]
    if acc["complete"] < trials:
        o.problems.append(f"{acc['complete']} complete, wanted {trials}")
    if acc["csv_problem"]:
        o.problems.append(acc["csv_problem"])
    if acc["baselines"] != N_BASELINES:
        o.problems.append(f"{acc['baselines']} baselines complete, wanted {N_BASELINES}")
    chk = [check_run_dir(work / f"{study}-w{i}" / study) for i in (1, 2)]
    o.half_written = chk[0]["half_written"] + chk[1]["half_written"]
    o.leftover_tmp = chk[1]["leftover_tmp"]
    o.seconds = time.time() - t0
    log(o.line())
    return o


# --------------------------------------------------------------------------- Ray cluster

def ray_available() -> None:
    if shutil.which("ray") is None:
        raise SkipFault("the `ray` command is not installed")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SkipFault("the ray package is not installed") from None


def _node_ports() -> list[str]:
    # two nodes on one machine must not share the per-node agent ports (fixed by default)
    return ["--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port())]


class RayCluster:
    """`ray start --head` plus one `ray start --address` worker node, both on 127.0.0.1, token
    authentication on (as tests/test_distributed_ray.py)."""

    def __init__(self, root: Path) -> None:
        ray_available()
        root.mkdir(parents=True, exist_ok=True)
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.tmp, port = tempfile.mkdtemp(prefix="rf", dir="/tmp"), free_port()
        self.logs: list[Path] = []
        self.address = f"127.0.0.1:{port}"
        self.head = self._start(["--head", "--port", str(port), "--num-cpus", "1",
                                 "--include-dashboard=false", "--temp-dir", self.tmp])
        self.workers: list[subprocess.Popen] = []

    def _start(self, args: list[str]) -> subprocess.Popen:
        logf = Path(self.tmp) / f"node-{len(self.logs)}.log"
        self.logs.append(logf)
        with open(logf, "w") as fh:
            return subprocess.Popen(["ray", "start", "--block", "--node-ip-address", "127.0.0.1",
                                     "--disable-usage-stats", *_node_ports(), *args],
                                    env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def add_worker(self) -> subprocess.Popen:
        proc = self._start(["--address", self.address, "--num-cpus", "1"])
        self.workers.append(proc)
        return proc

    def alive_nodes(self) -> int:
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        try:
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                                 text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return 0
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0

    def wait_nodes(self, n: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() != n:
            if time.time() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.logs)
                raise RuntimeError(f"the cluster never had {n} live nodes:\n{tails}")
            time.sleep(1)

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait_s: float = 30) -> None:
        try:
            os.killpg(proc.pid, sig)  # the node's raylet and its workers share the group
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for proc in [*self.workers, self.head]:
            self.kill(proc, signal.SIGTERM, 3)
            self.kill(proc)
        for pid in os.listdir("/proc"):  # anything of ours that left the process group
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if self.tmp.encode() in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def kill_ray_node(cluster: RayCluster, model: Path, runs: Path, study: str,
                  rng: random.Random, trials: int = 14, timeout: float = 500) -> Outcome:
    """A Ray search on a head + worker node; the worker node's process group (raylet and its
    workers) SIGKILLed after k complete trials (random k); the search must finish (or finish
    with --resume); 0 lost, 0 duplicated, 0 half-written. A fresh worker node is started
    for the next round."""
    t0 = time.time()
    if not any(p.poll() is None for p in cluster.workers):
        cluster.add_worker()
        cluster.wait_nodes(2)
    worker = next(p for p in cluster.workers if p.poll() is None)
    s = {"model": str(model), "runs_dir": str(runs), "study": study, "trials": trials,
         "seed": rng.randint(0, 10_000), **FAST, "eval_tokens": 1024,
         "dequant_cache": "100MB"}
    extra = ("--backend", "ray", "--address", cluster.address, "--cpus-per-trial", "1",
             "--max-concurrent", "2")
    run, db = runs / study, runs / study / "study.db"
    proc = subprocess.Popen(search_argv(s, *extra), env=cluster.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    k = rng.randint(1, trials - 2)
    d = rng.uniform(0.0, 1.0)
    while proc.poll() is None and n_complete_fast(db) < k and time.time() - t0 < timeout:
        time.sleep(0.05)
    time.sleep(d)
    RayCluster.kill(worker)
    before = complete_trials(db, study)
    o = Outcome("SIGKILL Ray worker node", f"{d:.2f}s after {k} complete; "
                f"{len(before)} complete at the kill")
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _sigkill(proc)
        err = b"(timed out)"
    err = err.decode(errors="replace")
    if proc.returncode != 0:
        o.detail += f"; search exit {proc.returncode}, resumed"
        res = run_cli(search_argv(s, *extra, "--resume"), env=cluster.env, timeout=timeout)
        o.completed = res.returncode == 0
        if not o.completed:
            o.problems.append(f"resume exit {res.returncode}: {res.stderr[-800:]}")
    else:
        o.completed = True
        o.detail += "; finished without resume"
    if "Traceback" in err and proc.returncode != 0:
        o.problems.append(f"traceback from the search: {err[-500:]}")
    acc = account(db, study, before, run / "trials.csv", trials)
    o.lost, o.duplicated = acc["lost"], acc["duplicated"]
    if acc["complete"] != trials:
        o.problems.append(f"{acc['complete']} complete, wanted {trials}")
    if acc["csv_problem"]:
        o.problems.append(acc["csv_problem"])
    chk = check_run_dir(run)
    o.half_written, o.leftover_tmp = chk["half_written"], chk["leftover_tmp"]
    o.seconds = time.time() - t0
    log(o.line())
    return o


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random Llama (llmpareto.tiny), built once in `folder`."""
    from llmpareto.tiny import build_tiny_model

    if not (folder / "config.json").exists():
        build_tiny_model(folder)
    return folder
