"""Fault-suite damage: a full disk during a search and damaged inputs (study.db, GGUF,
recipe JSON, device profiles in the wrong unit), each to be refused clearly."""

from __future__ import annotations

import hashlib
import json
import random
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

from llmpareto.tests.faults.checks import (
    Outcome,
    account,
    check_file,
    check_run_dir,
    complete_trials,
    log,
)
from llmpareto.tests.faults.kills import CLI, FAST, clear_refusal, error_lines, run_cli, search_argv

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


SMALLER = 0.8  # a size the run never filled is retried this much smaller
DISK_ATTEMPTS = 4


def _search_in(runs: Path, s: dict, size: int, mode: str, timeout: float):
    """The search of `s` with its run directory limited to `size` bytes."""
    if mode == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(runs)],
                       check=True, capture_output=True)
        return run_cli(search_argv(s), timeout=timeout)
    return run_cli(search_argv(s), timeout=timeout, preexec_fn=_fsize_limit(size))


def disk_full(model: Path, work: Path, study: str, size: int, rng: random.Random,
              mode: str = "auto", trials: int = 8, timeout: float = 300,
              attempts: int = DISK_ATTEMPTS) -> Outcome:
    """A search whose run directory fills up at `size` bytes: a tmpfs of that size where this
    user may mount one (mode "tmpfs"), else RLIMIT_FSIZE in the child (mode "rlimit": any
    write past `size` bytes of one file fails with EFBIG). A run that finishes inside the limit
    injected nothing: it is started again from nothing with a smaller limit, up to `attempts`
    times, after which the outcome fails. The run must stop with exit != 0, one
    `llmpareto: error:` line and no traceback, leave no half-written file, and `--resume`
    without the limit must complete with no completed trial lost."""
    t0 = time.time()
    if mode == "auto":
        mode = "tmpfs" if tmpfs_works(work) else "rlimit"
    runs = work / f"disk-{study}"
    s = {"model": str(model), "runs_dir": str(runs), "study": study, "trials": trials,
         "seed": rng.randint(0, 10_000), **FAST}
    o = Outcome(f"disk full ({mode})", f"{size // 1024} KiB")
    mounted = False
    try:
        for attempt in range(1, attempts + 1):
            if mounted:
                subprocess.run(["umount", "-l", str(runs)], capture_output=True, check=False)
                mounted = False
            shutil.rmtree(runs, ignore_errors=True)
            runs.mkdir(parents=True)
            mounted = mode == "tmpfs"
            res = _search_in(runs, s, size, mode, timeout)
            if res.returncode != 0 or attempt == attempts:
                break
            size = int(size * SMALLER)
        if attempt > 1:
            o.detail += f"; try {attempt} at {size // 1024} KiB"
        run, db = runs / study, runs / study / "study.db"
        errs = error_lines(res.stderr)
        o.injected = res.returncode != 0 and any(
            w in line for line in errs for w in ("disk", "space", "too large", "limit"))
        if res.returncode == 0:
            o.detail += "; the limit was never hit"
            o.problems.append(f"the run finished inside {size} bytes in {attempt} tries: "
                              "no full disk was tested")
        elif not o.injected:
            o.problems.append(f"exit {res.returncode} for another reason than a full disk: "
                              f"{res.stderr.strip()[-500:]}")
        if res.returncode != 0:
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
    o = Outcome(f"damaged study.db ({kind})", what, injected=check_file(db) is not None)
    if not o.injected:
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
    o = Outcome(fault, what, injected=True)  # the bad input was fed to the command
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
