"""Shared fixtures: a tiny random Llama with a small BPE tokenizer, built locally (no hub)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from llmpareto.tiny import build_tiny_model

# calibrated variants and preset recipes go to a throw-away cache, never the user's; removed
# when the session ends (20 MB a run: /tmp would fill with them)
_OWN_CACHE = None
if "LLMPARETO_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["LLMPARETO_CACHE"] = tempfile.mkdtemp(prefix="llmpareto-test-cache-")


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def bench4(tmp_path_factory):
    """A 4-block tiny random Llama (initializer_range 0.2: far from uniform logits) on the
    search's workbench."""
    from llmpareto.search.runner import TrialRunner
    from llmpareto.search.settings import SearchSettings

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny4") / "model", num_hidden_layers=4,
                              initializer_range=0.2)
    return TrialRunner(SearchSettings(model=str(folder), window=64, eval_tokens=256,
                                      calib_tokens=2048, progress=False, presets="none",
                                      formats="q8_0,f16", context=256))


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (a killed writer's, for temporaries' names)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def tiny_settings(tiny_model_dir, tmp_path) -> dict:
    """Keyword arguments for a fast search on the tiny model."""
    return {"model": str(tiny_model_dir), "runs_dir": str(tmp_path / "runs"), "study": "t",
            "window": 64, "eval_tokens": 256, "calib_tokens": 128, "trials": 10,
            "progress": False, "context": 512,
            # the pre-K-quant formats, no llama.cpp presets: tests count these baselines (the
            # K-quants and presets have their own tests; every K-quant falls back at width 64)
            "formats": "f16,q8_0,q5_1,q5_0,q4_1,q4_0,tq2_0", "presets": "none"}


class StudyWatch:
    """Reads a running search's study.db from outside, as a user's monitoring would."""

    @staticmethod
    def complete(db: Path, study: str) -> list:
        try:
            s = optuna.load_study(study_name=study, storage=f"sqlite:///{db}")
        except Exception:  # noqa: BLE001 - not created yet
            return []
        return s.get_trials(states=(TrialState.COMPLETE,))

    @staticmethod
    def start_search(settings: dict) -> subprocess.Popen:
        """`llmpareto search` with `settings` as flags, in a subprocess a test can kill."""
        import sys

        argv = [sys.executable, "-m", "llmpareto.cli", "search", "--no-progress"]
        for k, v in settings.items():
            if k != "progress":
                argv += [f"--{k.replace('_', '-')}", str(v)]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill_when_complete(self, proc: subprocess.Popen, db: Path, study: str, n: int,
                           timeout_s: float, poll_s: float = 0.05) -> dict:
        """SIGKILL `proc` once `n` trials are complete (or it ended, or time ran out); returns
        the trials complete then, number -> (values, params)."""
        from llmpareto.tests.faults.checks import n_complete_fast

        deadline = time.time() + timeout_s
        # polled with sqlite3 (milliseconds), not optuna.load_study (a tenth of a second or
        # more): fast trials would otherwise all finish between two polls
        while n_complete_fast(db) < n and time.time() < deadline and proc.poll() is None:
            time.sleep(min(poll_s, 0.01))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return {t.number: (t.values, t.params) for t in self.complete(db, study)}


@pytest.fixture
def study_watch() -> StudyWatch:
    return StudyWatch()
