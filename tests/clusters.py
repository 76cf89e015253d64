"""Throwaway servers for the distributed tests and the fault suite: a PostgreSQL server and a
two-node Ray cluster, both on 127.0.0.1, as `llmpareto.tests.clusters`."""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

S = TypeVar("S")  # a server: PgServer or RayCluster


class Unavailable(Exception):
    """A server that cannot be started here (not installed): the reason says why and how to
    install it. Callers skip, except under CI=true, where a missing component fails the test
    that claims it (`missing`)."""


def in_ci() -> bool:
    """CI=true (set by .ci/run and most CI services): what a test claims must be here."""
    return os.environ.get("CI", "").lower() == "true"


def missing(why: object) -> None:
    """A real component this test needs is not installed: a failure under CI=true (the test
    would otherwise pass without testing what it names), else a skip."""
    import pytest

    if in_ci():
        pytest.fail(f"{why} (CI=true: a test that claims a real component must not skip)",
                    pytrace=False)
    pytest.skip(str(why))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(start: Callable[[], S]) -> Iterator[S]:
    """The body of a module-scoped fixture: the server `start()` gives (missing(): skipped, or
    failed under CI=true, when it is Unavailable), stopped after."""
    try:
        server = start()
    except Unavailable as why:
        missing(why)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------ PostgreSQL

PG_INSTALL = ("install the PostgreSQL server first (Debian/Ubuntu: `apt-get install -y "
              "postgresql`; tests/setup.sh does it), then run the tests again")


def pg_bindir() -> Path:
    """The PostgreSQL server binaries (initdb, pg_ctl) of the newest installed version. Tests
    install nothing: tests/setup.sh (the README's test command) installs the server."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("initdb"):
        found = [shutil.which("initdb")]
    if not found:
        raise Unavailable(f"no PostgreSQL server binaries (initdb): {PG_INSTALL}")
    return Path(found[-1]).parent


class PgServer:
    """A throwaway PostgreSQL server on 127.0.0.1 and a free port, data in a temp dir;
    `new_db()` gives a database URL, `stop()` removes it all."""

    def __init__(self, prefix: str = "llmpareto-pg-") -> None:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg2 is not installed (pip install -e '.[dev]' or "
                              "'llmpareto[postgres]')") from None
        self.bindir = pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data, self.port = self.root / "data", free_port()
        # PostgreSQL refuses to run as root: run it as the `postgres` user the package creates
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

    def new_db(self, name: str | None = None) -> str:
        self.dbs += 1
        name = name or f"db{self.dbs}"
        subprocess.run([*self.as_pg, str(self.bindir / "psql"), "-h", "127.0.0.1", "-p",
                        str(self.port), "-U", "postgres", "-c", f"CREATE DATABASE {name}"],
                       check=True, capture_output=True)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self.as_pg, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                        "fast", "-w", "stop"], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------------------------- Ray

def ray_available() -> None:
    if shutil.which("ray") is None:
        raise Unavailable("the `ray` command is not installed")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise Unavailable("the ray package is not installed") from None


def _node_ports() -> list[str]:
    # two nodes on one machine must not share the per-node agent ports (fixed by default)
    return ["--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port())]


class RayCluster:
    """`ray start --head` plus `ray start --address` worker nodes (`add_worker()`), all on
    127.0.0.1; `stop()` kills them all."""

    def __init__(self, root: Path, prefix: str = "rt") -> None:
        ray_available()
        root.mkdir(parents=True, exist_ok=True)
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        # Token auth stays on: every node and every driver reads the same token file.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.tmp, port = tempfile.mkdtemp(prefix=prefix, dir="/tmp"), free_port()
        self.logs: list[Path] = []
        self.address = f"127.0.0.1:{port}"
        self.head = self._start(["--head", "--port", str(port), "--num-cpus", "1",
                                 "--include-dashboard=false", "--temp-dir", self.tmp])
        self.workers: list[subprocess.Popen] = []

    def _start(self, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = Path(self.tmp) / f"node-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as fh:
            return subprocess.Popen(["ray", "start", "--block", "--node-ip-address", "127.0.0.1",
                                     "--disable-usage-stats", *_node_ports(), *args],
                                    env={**self.env, **(env or {})}, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def add_worker(self, env: dict | None = None) -> subprocess.Popen:
        """A worker node (`env`: variables that differ on it, e.g. another PYTHONPATH)."""
        proc = self._start(["--address", self.address, "--num-cpus", "1"], env)
        self.workers.append(proc)
        return proc

    def log_tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-1500:]}" for log in self.logs)

    def alive_nodes(self) -> int:
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))")
        try:
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                                 text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return 0
        # Ray may print warnings (a lagging raylet) on the same stream
        found = re.findall(r"^alive nodes: (\d+)$", out.stdout, re.MULTILINE)
        return int(found[-1]) if out.returncode == 0 and found else 0

    def wait_nodes(self, n: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() != n:
            if time.time() > deadline:
                raise RuntimeError(f"the cluster never had {n} live nodes:\n{self.log_tails()}")
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
            self.kill(proc, signal.SIGTERM, 3)  # let the raylets say goodbye to the GCS first
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
