"""Atomic file output: every file the tool writes goes to a temporary name beside its target and is
renamed over it, so a kill or a full disk leaves the old file or the new one, never half of one.

Temporaries are named `.<name>.<pid>.<random>.tmp`; `remove_stale` deletes those whose writer
process is gone (a killed run's leftovers), never a live writer's.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmpareto.errors import UserError

_TMP = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _write_error(path: Path, exc: OSError) -> UserError:
    why = exc.strerror or str(exc)
    if not path.parent.is_dir():
        return UserError(f"cannot write {path}: {path.parent} is not an existing folder; "
                         f"choose another path")
    return UserError(f"cannot write {path} ({why}); free disk space or choose another folder, "
                     f"then run the command again (files already written are kept)")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(path: Path, new: int) -> int:
    """An existing file's permissions, else what the umask gives a new one."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return new & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path in `path`'s folder; on success it is renamed to `path`, on any
    error it is removed and `path` is left as it was. A failed write (full disk, file-size
    limit) becomes a UserError naming the file."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                    dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _mode(path, 0o666))  # mkstemp makes 0600: give what open() would
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `path`, renamed to `path` when the block succeeds (an
    existing `path` is replaced only with `replace`); removed on any error."""
    path = Path(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                    dir=path.parent))
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        os.chmod(tmp, _mode(path, 0o777))
        yield tmp
        if path.exists() and replace:
            old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(path, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(folder: str | Path, recursive: bool = True,
                 target: str | None = None) -> list[Path]:
    """Delete temporaries under `folder` whose writer process no longer runs on this host;
    returns what was removed. `target`: only those written for that name, directly in `folder`
    (an export's folder beside the user's other files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if target is not None:
        found = folder.glob(f".{glob.escape(target)}.*.tmp")
    else:
        found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed = []
    for p in list(found):
        m = _TMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
