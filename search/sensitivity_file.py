"""RUN/sensitivity.json, the one reader: its form (keys, types, aligned lists) checked with a
message per defect. Light (no torch): `llmpareto sensitivity` reads it without a model; the
search (search/sensitivity.py) also checks that it was measured for this run's model and text."""

from __future__ import annotations

import json
from numbers import Real
from pathlib import Path
from typing import Any

from llmpareto.errors import UserError

FILE = "sensitivity.json"
VERSION = 1
REQUIRED = ("version", "model_sha256", "text_sha256", "space", "tokens", "reference",
            "reference_kl_nats", "choices", "delta_kl_nats", "seconds", "evaluations")
NUMBERS = ("tokens", "seconds", "evaluations")  # printed in the header: must be numbers


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); it is written by the search: "
                        "run the search again to rewrite it") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top, got "
                        f"{type(data).__name__}")
    return data


def _check_key(path: Path, key: str, choices: Any, deltas: Any) -> None:
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{path}: choices[{key!r}] must be a non-empty list")
    if any(not (isinstance(c, str) or _is_number(c)) for c in choices):
        raise UserError(f"{path}: choices[{key!r}] must hold strings or numbers")
    if not isinstance(deltas, list):
        raise UserError(f"{path}: delta_kl_nats[{key!r}] must be a list, aligned with "
                        f"choices[{key!r}]")
    if len(deltas) != len(choices):
        raise UserError(f"{path}: key {key!r} has {len(choices)} choices but "
                        f"{len(deltas)} delta_kl_nats values; they must be aligned")
    if any(d is not None and not _is_number(d) for d in deltas):
        raise UserError(f"{path}: delta_kl_nats[{key!r}] must hold numbers or null")


def _check(path: Path, data: dict) -> None:
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"{path} lacks the key(s) {', '.join(missing)}; it was not written by "
                        "this llmpareto's search: run the search again to rewrite it")
    if data["version"] != VERSION:
        raise UserError(f"{path} has version {data['version']!r}; this llmpareto reads "
                        f"version {VERSION}: use the llmpareto that wrote it")
    for k in NUMBERS:
        if not _is_number(data[k]):
            raise UserError(f"{path}: {k} must be a number, got {data[k]!r}")
    if data["reference_kl_nats"] is not None and not _is_number(data["reference_kl_nats"]):
        raise UserError(f"{path}: reference_kl_nats must be a number or null")
    choices, deltas = data["choices"], data["delta_kl_nats"]
    for name, v in (("choices", choices), ("delta_kl_nats", deltas), ("reference",
                                                                       data["reference"])):
        if not isinstance(v, dict):
            raise UserError(f"{path}: {name} must be an object keyed by parameter name")
    for key in choices:
        if key not in deltas:
            raise UserError(f"{path}: key {key!r} is in choices but not in delta_kl_nats")
        _check_key(path, key, choices[key], deltas[key])
    extra = [k for k in deltas if k not in choices]
    if extra:
        raise UserError(f"{path}: key {extra[0]!r} is in delta_kl_nats but not in choices")


def read_profile(path: str | Path) -> dict:
    """The profile at `path`, its form checked; UserError naming the first defect."""
    path = Path(path)
    data = _read_json(path)
    _check(path, data)
    return data
