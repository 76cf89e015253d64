"""Finding and reading profiles: shipped names, a user's TOML path, or the measured host."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmpareto import atomic
from llmpareto.device_profiles.schema import DeviceProfile, profile_from_dict
from llmpareto.errors import UserError

HOST = "host"


def profile_dir() -> Path:
    return Path(__file__).resolve().parent


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.toml"))


def host_cache_path() -> Path:
    """Where `--device host` keeps its measured profile (LLMPARETO_HOST_PROFILE overrides)."""
    env = os.environ.get("LLMPARETO_HOST_PROFILE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "llmpareto" / "host.toml"


def read_toml(path: Path) -> DeviceProfile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"device profile {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise UserError(f"device profile {path}: cannot be read ({exc.strerror})") from None
    return profile_from_dict(data, str(path))


def load_profile(spec: str | Path,
                 measure_host: Callable[[], DeviceProfile] | None = None) -> DeviceProfile:
    """A shipped name, a path to a TOML file, or 'host': the cached measurement of this machine,
    made on first use by `measure_host` (evaluators.host.load_device passes the measurement;
    without one, an uncached host is one line saying how to measure it)."""
    spec_s = str(spec)
    if spec_s == HOST:
        path = host_cache_path()
        if not path.is_file():
            if measure_host is None:
                raise UserError(f"no measured host profile at {path}; run "
                                "`llmpareto profile-host` first")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, dump_toml(measure_host()))
        return read_toml(path)
    path = Path(spec_s).expanduser()
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise UserError(f"--device {spec_s}: no such file")
        return read_toml(path)
    shipped = profile_dir() / f"{spec_s}.toml"
    if shipped.is_file():
        return read_toml(shipped)
    raise UserError(f"--device {spec_s!r}: unknown device; use one of {', '.join(list_profiles())}, "
                    "'host' (measured here), or a path to your own .toml profile")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return repr(int(v))
    if isinstance(v, float):
        return repr(float(v))  # numpy floats too (their repr is np.float64(...))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    return f'"{s}"'


def dump_toml(profile: DeviceProfile) -> str:
    """The profile as TOML that read_toml reads back to an equal profile."""
    d = profile.to_dict()
    lines = [f"# Device profile {profile.name}: {profile.description}", ""]
    rows = d.pop("measurements", [])
    kernels = d.pop("sparse_kernels", {})
    for key, value in d.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for table in ("peak_flops", "kernel_weights_per_s", "sources"):
        if table == "kernel_weights_per_s" and not d[table]:
            continue
        lines += ["", f"[{table}]"]
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in d[table].items()]
    for pattern, k in kernels.items():
        lines += ["", f'[sparse_kernels."{pattern}"]', *(f"{key} = {_toml_value(v)}"
                                                        for key, v in k.items())]
    for row in rows:
        lines += ["", "[[measurements]]", *(f"{k} = {_toml_value(v)}" for k, v in row.items())]
    return "\n".join(lines) + "\n"
