"""DeviceProfile: what a target device can do, as data with a cited source for every number.

Strict: an unknown key, a missing field, a wrong type or a value out of range is an error
that names the file and the field. Imports nothing heavy (tomllib and dataclasses only).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llmpareto.errors import UserError

SCHEMA_VERSION = 1
DTYPES = ("f32", "f16", "bf16", "int8")
SPARSE_PATTERNS = ("2:4",)
_TEST = re.compile(r"(tg|decode@)([1-9][0-9]*)")
ROLES = ("fit", "held-out")


@dataclass(frozen=True)
class Measurement:
    """A decode speed measured on the device, which a profile was fitted on or is checked by."""

    model: str  # a shape in llmpareto.shapes.KNOWN_SHAPES
    # lower case: one weight format for every projection, the embedding and the head (a file
    # written so); upper case: a llama.cpp preset (Q4_K_M, Q4_0, ...), as `llama-quantize`
    # mixes it (llmpareto.preset_rules); a published "Q4_0" file has a q6_K output head
    format: str
    test: str  # "tgN" (llama-bench: N tokens decoded from an empty cache) or "decode@C"
    tokens_per_s: float
    role: str  # "fit": the profile's numbers were fitted on it; "held-out": kept out, a check
    date: str  # when it was measured (and the runtime build, where known)
    source: str  # URL, or "measured: ..." for measurements of this project

    @property
    def context(self) -> int:
        """Mean KV length while decoding: tgN averages over 0..N, decode@C is C."""
        kind, n = _TEST.fullmatch(self.test).groups()
        return int(n) // 2 if kind == "tg" else int(n)


@dataclass(frozen=True)
class SparseKernel:
    """How a runtime runs one sparse pattern: the weight formats its kernels take and the
    speed-up they reach over the dense kernel on the same format (cited or measured)."""

    runtime: str  # e.g. "vLLM, compressed-tensors sparse-24-bitmask, CUTLASS 2:4 GEMM"
    formats: tuple[str, ...]  # weight formats stored sparse (kept values in this format)
    decode_speedup: float  # dense matmul time / sparse matmul time, one decoded token
    prefill_speedup: float  # the same for prefill (compute-bound) matmuls
    # smaller matrices are kept dense (where the sparse kernel measured slower than dense)
    min_weights: int = 0


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    runtime: str  # the runtime whose measured efficiencies the profile carries
    memory_bytes: int  # memory usable for the model (RAM, or VRAM for a discrete GPU)
    bandwidth_Bps: float  # peak memory bandwidth, bytes/s
    eta_mem: float  # fraction of bandwidth a real runtime reaches in decode
    eta_compute: float  # fraction of peak_flops a real runtime reaches in prefill matmuls
    overhead_s_per_token: float  # fixed per-token cost (launches, sync, sampling)
    fast_formats: tuple[str, ...]  # weight formats with native kernels on this device
    sparse: tuple[str, ...]  # sparse patterns the runtime runs (e.g. "2:4"); () if none
    power_active_w: float
    power_idle_w: float
    energy_pj_per_byte: float  # memory traffic energy
    energy_pj_per_flop: float  # compute energy
    peak_flops: dict[str, float]  # dtype -> FLOP/s (OP/s for int8)
    sources: dict[str, str]  # field (or "peak_flops.<dtype>") -> URL or "derived: ..."
    # Per-block launch cost of runtimes that run a kernel (or a Python module) per layer;
    # optional, 0 for runtimes that fuse a whole token into one graph.
    overhead_s_per_layer: float = 0.0
    # Weights per second a format's decode kernel can process at most (unpacking is compute:
    # on small CPUs q5_* decode slower than q8_0 despite fewer bytes); optional, measured.
    kernel_weights_per_s: dict[str, float] = field(default_factory=dict)
    # Decode attention throughput, in cached K values (blocks x KV heads x head dim x
    # positions) per second: a CPU runtime's scores, softmax and value sums are slower than
    # the KV bytes alone; optional, measured, 0 = the roofline of the KV bytes only.
    attention_values_per_s: float = 0.0
    # Published or measured decode speeds, each marked fit or held-out, each with its source
    # (`llmpareto devices NAME` prints predicted vs measured for both kinds)
    measurements: tuple[Measurement, ...] = ()
    # One entry per pattern in `sparse`: the kernels that use it (docs/sparsity.md)
    sparse_kernels: dict[str, SparseKernel] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    path: str = field(default="", compare=False)  # file it was read from, for messages

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`; a missing dtype runs at the best float rate there is."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        for alt in ("f16", "bf16", "f32"):
            if alt in self.peak_flops:
                return self.peak_flops[alt]
        return max(self.peak_flops.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        if not self.measurements:
            d.pop("measurements")  # optional: absent, not an empty list, in TOML and JSON
        if not self.sparse_kernels:
            d.pop("sparse_kernels")
        d["fast_formats"], d["sparse"] = list(self.fast_formats), list(self.sparse)
        return d


# field -> (type, lower bound, inclusive?, upper bound); bounds catch a number in the wrong unit
# (8 for 8 GB, 17.07 for 17.07 GB/s, 500000 mW) with room for any real device: 64 MiB..32 TiB of
# memory, 0.1 GB/s..100 TB/s, 0.1 W..5 kW
_NUMBERS = {
    "memory_bytes": (int, 2**26, True, 2**45),
    "bandwidth_Bps": (float, 1e8, True, 1e14),
    "eta_mem": (float, 0, False, 1.0),
    "eta_compute": (float, 0, False, 1.0),
    "overhead_s_per_token": (float, 0, True, math.inf),
    "power_active_w": (float, 0.1, True, 5000.0),
    "power_idle_w": (float, 0, True, math.inf),
    "energy_pj_per_byte": (float, 0, False, math.inf),
    "energy_pj_per_flop": (float, 0, False, math.inf),
}
_UNITS = {  # what a wrong-unit value most likely meant
    "memory_bytes": "the unit is bytes: 8 GiB is 8589934592",
    "bandwidth_Bps": "the unit is bytes per second: 17 GB/s is 17e9",
    "power_active_w": "the unit is watts",
    **{f"peak_flops.{d}": "the unit is FLOP/s: 989 TFLOP/s is 989e12" for d in DTYPES},
}
_STRINGS = ("name", "description", "runtime")
_LISTS = ("fast_formats", "sparse")
_TABLES = ("peak_flops", "sources")
_OPTIONAL = {"schema_version": SCHEMA_VERSION, "overhead_s_per_layer": 0.0,
             "kernel_weights_per_s": {}, "attention_values_per_s": 0.0, "measurements": [],
             "sparse_kernels": {}}
_ALL = {*_OPTIONAL, *_NUMBERS, *_STRINGS, *_LISTS, *_TABLES}


def _err(where: str, msg: str) -> UserError:
    return UserError(f"device profile {where}: {msg}")


def _number(where: str, key: str, value: Any, kind: type, lo: float, incl: bool,
            hi: float) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(where, f"field '{key}' must be a number, got {type(value).__name__} {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise _err(where, f"field '{key}' must be a whole number of bytes, got {value!r}")
    if not math.isfinite(value) or value < lo or (value == lo and not incl) or value > hi:
        bound = f">= {lo:g}" if incl else f"> {lo:g}"
        bound += f" and <= {hi:g}" if hi != math.inf else ""
        hint = f"; {_UNITS[key]}" if key in _UNITS else ""
        raise _err(where, f"field '{key}' = {value!r} is out of range (must be {bound}){hint}")
    return kind(value)


def profile_from_dict(data: dict[str, Any], where: str = "<dict>") -> DeviceProfile:
    """Validate a parsed TOML table and build the profile; errors name `where` and the field."""
    from llmpareto.formats import FORMATS

    unknown = sorted(set(data) - _ALL)
    if unknown:
        raise _err(where, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_ALL))}")
    missing = sorted((_ALL - set(_OPTIONAL)) - set(data))
    if missing:
        raise _err(where, f"missing field(s) {', '.join(missing)}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise _err(where, f"schema_version {version!r} is not supported (this llmpareto reads "
                          f"{SCHEMA_VERSION})")
    out: dict[str, Any] = {}
    for key in _STRINGS:
        if not isinstance(data[key], str) or not data[key].strip():
            raise _err(where, f"field '{key}' must be a non-empty string")
        out[key] = data[key]
    for key, spec in _NUMBERS.items():
        out[key] = _number(where, key, data[key], *spec)
    out["overhead_s_per_layer"] = _number(where, "overhead_s_per_layer",
                                          data.get("overhead_s_per_layer", 0.0), float, 0, True,
                                          math.inf)
    for key, allowed in (("fast_formats", FORMATS), ("sparse", SPARSE_PATTERNS)):
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _err(where, f"field '{key}' must be a list of strings")
        bad = [v for v in value if v not in allowed]
        if bad:
            raise _err(where, f"field '{key}' has unknown value(s) {bad}; allowed: "
                              f"{', '.join(allowed)}")
        out[key] = tuple(value)
    peaks = data["peak_flops"]
    if not isinstance(peaks, dict) or not peaks:
        raise _err(where, "field 'peak_flops' must be a table of dtype = FLOP/s")
    bad = sorted(set(peaks) - set(DTYPES))
    if bad:
        raise _err(where, f"field 'peak_flops' has unknown dtype(s) {bad}; allowed: {', '.join(DTYPES)}")
    # 0.1 GFLOP/s .. 1e18: a value in GFLOP/s or TFLOP/s (e.g. 989.4) is refused
    out["peak_flops"] = {k: _number(where, f"peak_flops.{k}", v, float, 1e8, True, 1e18)
                         for k, v in peaks.items()}
    sources = data["sources"]
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise _err(where, "field 'sources' must be a table of field = \"URL or derived: ...\"")
    needed = [*_NUMBERS, *_LISTS, *(f"peak_flops.{k}" for k in peaks)]
    out["attention_values_per_s"] = _number(where, "attention_values_per_s",
                                            data.get("attention_values_per_s", 0.0), float, 0,
                                            True, math.inf)
    needed += [k for k in ("overhead_s_per_layer", "attention_values_per_s") if out[k]]
    kernels = data.get("kernel_weights_per_s", {})
    if not isinstance(kernels, dict) or set(kernels) - set(FORMATS):
        raise _err(where, "field 'kernel_weights_per_s' must be a table of weight format = "
                          f"weights/s; formats: {', '.join(FORMATS)}")
    out["kernel_weights_per_s"] = {
        k: _number(where, f"kernel_weights_per_s.{k}", v, float, 0, False, math.inf)
        for k, v in kernels.items()}
    needed += [f"kernel_weights_per_s.{k}" for k in kernels]
    unsourced = [k for k in needed if not sources.get(k, "").strip()]
    if unsourced:
        raise _err(where, f"no source for {', '.join(unsourced)}; add a URL or a 'derived: ...' "
                          "note under [sources]")
    out["sparse_kernels"] = _sparse_kernels(where, data.get("sparse_kernels", {}), out["sparse"])
    unsourced = [f"sparse_kernels.{k}" for k in out["sparse_kernels"]
                 if not sources.get(f"sparse_kernels.{k}", "").strip()]
    if unsourced:
        raise _err(where, f"no source for {', '.join(unsourced)}; cite the measured speed-ups "
                          "under [sources]")
    out["sources"] = dict(sources)
    out["measurements"] = _measurements(where, data.get("measurements", []))
    if out["power_idle_w"] > out["power_active_w"]:
        raise _err(where, "power_idle_w is above power_active_w")
    return DeviceProfile(**out, schema_version=SCHEMA_VERSION, path=where)


_KERNEL_FIELDS = ("runtime", "formats", "decode_speedup", "prefill_speedup", "min_weights")


def _sparse_kernels(where: str, table: Any, patterns: tuple[str, ...]) -> dict[str, SparseKernel]:
    """[sparse_kernels."2:4"] tables: exactly one for each pattern of `sparse`."""
    from llmpareto.formats import FORMATS

    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise _err(where, "'sparse_kernels' must be tables like [sparse_kernels.\"2:4\"]")
    if set(table) != set(patterns):
        raise _err(where, f"'sparse' lists {list(patterns)} but [sparse_kernels] describes "
                          f"{sorted(table)}: give one [sparse_kernels.\"N:M\"] table (runtime, "
                          "formats, decode_speedup, prefill_speedup) per pattern the runtime runs")
    out = {}
    for pattern, row in table.items():
        at = f"sparse_kernels.{pattern}"
        if not set(_KERNEL_FIELDS[:4]) <= set(row) <= set(_KERNEL_FIELDS):
            raise _err(where, f"{at}: fields must be {', '.join(_KERNEL_FIELDS)} (min_weights "
                              f"optional); got {', '.join(sorted(row))}")
        fmts = row["formats"]
        if not isinstance(fmts, list) or not fmts or any(f not in FORMATS for f in fmts):
            raise _err(where, f"{at}: formats must be a non-empty list of weight formats "
                              f"({', '.join(FORMATS)})")
        if not isinstance(row["runtime"], str) or not row["runtime"].strip():
            raise _err(where, f"{at}: runtime must be a non-empty string")
        out[pattern] = SparseKernel(row["runtime"], tuple(fmts), *(
            _number(where, f"{at}.{k}", row[k], float, 0, False, math.inf)
            for k in ("decode_speedup", "prefill_speedup")),
            _number(where, f"{at}.min_weights", row.get("min_weights", 0), int, 0, True,
                    math.inf))
    return out


_MEASUREMENT_FIELDS = tuple(f.name for f in fields(Measurement))


def _measurements(where: str, rows: Any) -> tuple[Measurement, ...]:
    """[[measurements]] rows: every field present, known and checked; the model a known shape."""
    from llmpareto.formats import FORMATS
    from llmpareto.preset_rules import RULE_PRESETS
    from llmpareto.shapes import KNOWN_SHAPES

    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise _err(where, "'measurements' must be an array of tables ([[measurements]])")
    out = []
    for i, row in enumerate(rows):
        at = f"measurements[{i}]"
        unknown, missing = set(row) - set(_MEASUREMENT_FIELDS), set(_MEASUREMENT_FIELDS) - set(row)
        if unknown or missing:
            raise _err(where, f"{at}: unknown field(s) {sorted(unknown)}, missing {sorted(missing)}"
                              f"; fields: {', '.join(_MEASUREMENT_FIELDS)}")
        for key in ("model", "format", "test", "role", "date", "source"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise _err(where, f"{at}: field '{key}' must be a non-empty string")
        checks = ((row["model"] in KNOWN_SHAPES, "model", ", ".join(KNOWN_SHAPES)),
                  (row["format"] in FORMATS or row["format"] in RULE_PRESETS, "format",
                   ", ".join([*FORMATS, *RULE_PRESETS])),
                  (_TEST.fullmatch(row["test"]) is not None, "test", "tgN or decode@C"),
                  (row["role"] in ROLES, "role", ", ".join(ROLES)))
        for ok, key, allowed in checks:
            if not ok:
                raise _err(where, f"{at}: {key} {row[key]!r} is not one of: {allowed}")
        speed = _number(where, f"{at}.tokens_per_s", row["tokens_per_s"], float, 0, False,
                        math.inf)
        out.append(Measurement(**{**row, "tokens_per_s": speed}))
    return tuple(out)


PROFILE_FIELDS = tuple(f.name for f in fields(DeviceProfile) if f.name != "path")
