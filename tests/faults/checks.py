"""Fault-suite checks: run directories and exports judged without llmpareto's code,
trial accounting (lost, duplicated) and the outcome table."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PNG_SIG = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TMP_NAME = re.compile(r"(^\..*\.tmp$)|(\.tmp$)|(\.partial$)")


def log(msg: str) -> None:
    print(f"[faults] {msg}", flush=True)


# ----------------------------------------------------------------------------- the checker

def is_tmp(name: str) -> bool:
    """A temporary: `.<name>.<pid>.<rand>.tmp` (llmpareto.atomic), any other `*.tmp`, or an
    export's `<out>.partial` folder. Leftovers, never counted as half-written outputs."""
    return bool(_TMP_NAME.search(name))


def check_file(p: Path) -> str | None:
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
            if is_tmp(d):
                out["leftover_tmp"].append(str(Path(dirpath) / d))
                dirnames.remove(d)
        for name in filenames:
            p = Path(dirpath) / name
            if is_tmp(name):
                out["leftover_tmp"].append(str(p))
                continue
            if name.endswith(("-journal", "-wal", "-shm")):  # SQLite's own
                continue
            out["files"] += 1
            why = check_file(p)
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
        if p.is_file() and not is_tmp(p.name) and (p.stat().st_mode & 0o777) != want:
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
    """One injected fault and what followed. `injected`: the fault really happened (the signal
    landed on a live process, the disk limit was hit, the damaged file was fed); an outcome
    whose fault never happened, or that left temporaries behind, is not ok."""
    fault: str
    detail: str = ""
    injected: bool = False
    completed: bool = False
    lost: int = 0
    duplicated: int = 0
    half_written: list = field(default_factory=list)
    leftover_tmp: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.injected and self.completed and not self.lost and not self.duplicated
                and not self.half_written and not self.leftover_tmp and not self.problems)

    def line(self) -> str:
        return (f"{self.fault} [{self.detail}]: injected={self.injected} "
                f"completed={self.completed} lost={self.lost} "
                f"duplicated={self.duplicated} half_written={len(self.half_written)} "
                f"leftover_tmp={len(self.leftover_tmp)} ({self.seconds:.0f} s)"
                + (f" problems={self.problems}" if self.problems else "")
                + (f" half={self.half_written}" if self.half_written else ""))


def summarize(outcomes: list[Outcome]) -> list[dict]:
    rows: dict[str, dict] = {}
    for o in outcomes:
        r = rows.setdefault(o.fault, {"fault": o.fault, "tried": 0, "injected": 0,
                                      "completed": 0, "lost": 0, "duplicated": 0,
                                      "half_written": 0, "leftover_tmp": 0})
        r["tried"] += 1
        r["injected"] += int(o.injected)
        r["completed"] += int(o.completed)
        r["lost"] += o.lost
        r["duplicated"] += o.duplicated
        r["half_written"] += len(o.half_written)
        r["leftover_tmp"] += len(o.leftover_tmp)
    return list(rows.values())


def table(outcomes: list[Outcome]) -> str:
    head = ("fault injected", "times tried", "landed", "completed after resume",
            "completed trials lost", "trials duplicated", "files left half-written",
            "leftover temporaries")
    rows = [(r["fault"], r["tried"], r["injected"], r["completed"], r["lost"], r["duplicated"],
             r["half_written"], r["leftover_tmp"]) for r in summarize(outcomes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
