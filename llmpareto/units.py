"""Parsing of human quantities on the command line (sizes in bytes)."""

from __future__ import annotations

import re

from llmpareto.errors import UserError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
SIZE_FORMS = "a number of bytes (120000000 or 1.2e8) or a number with a unit: 120MB, 0.5GB, 300MiB, 2GiB"


def parse_bytes(text: str | float, flag: str = "--max-memory") -> int:
    """'120MB' -> 120_000_000; decimal units are powers of 1000, *iB units powers of 1024."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise UserError(f"{flag} {text!r} is not a size; use {SIZE_FORMS}.")
        value, unit = float(m.group(1)), m.group(2).lower()
    result = round(value * _SIZE_UNITS[unit])
    if result <= 0:
        raise UserError(f"{flag} {text!r} must be more than 0 bytes; use {SIZE_FORMS}.")
    return result


def format_bytes(n: float) -> str:
    """Bytes as a short decimal string: 123.4 MB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
