"""llama.cpp importance-matrix (imatrix) files: read and write them, map their tensor names.

Read gives the per-column floats llama-quantize hands to the quantizer (same float32 arithmetic
as its `load_imatrix`); write makes a file `llama-quantize --imatrix` accepts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmpareto import atomic
from llmpareto.errors import UserError

# Keys llama.cpp's loader looks for (common/imatrix-loader.h); all three must be present, or
# llama-quantize stops with "missing imatrix metadata".
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
GGML_MAX_NAME = 64  # bytes, terminating zero included (ggml.h); longer names fail to load
# GGUF cannot hold an empty string array (the gguf package refuses one), and llama.cpp needs
# the key present, so a file written without a dataset name records this one.
DEFAULT_DATASET = "llmpareto"


@dataclass
class Imatrix:
    """An importance matrix as llama-quantize uses it."""

    # GGUF name (blk.0.attn_q.weight) -> float32 per input column, as llama-quantize uses them
    values: dict[str, np.ndarray]
    chunks: int | None = None  # calibration chunks, when the file records them
    chunk_size: int | None = None  # tokens per chunk (GGUF files only)
    datasets: list[str] = field(default_factory=list)
    legacy: bool = False  # read from the legacy .dat layout


def _bad(path, what: str) -> UserError:
    return UserError(f"imatrix file {path}: {what}; make it again with `llama-imatrix` "
                     f"(or `--imatrix on`), or pass another file")


# --- reading ---
def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """The values llama-quantize would use from a GGUF or legacy .dat imatrix (told apart by
    the GGUF magic, whatever the file's extension)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UserError(f"imatrix file {path}: cannot read it ({e.strerror}); check the path") \
            from None
    if size < 4:
        raise _bad(path, f"only {size} bytes, too short for an importance matrix")
    if head == b"GGUF":  # llama.cpp too tries GGUF first, then the legacy layout
        return _read_gguf(path, size)
    return _read_legacy(path, size)


class _Cursor:
    """Little-endian reads, each length checked against what is left of the file."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.left, self.path = f, size, path

    def take(self, n: int, what: str) -> bytes:
        if not 0 <= n <= self.left:
            raise _bad(self.path, f"truncated or not an imatrix: {what} needs {n} bytes, only "
                                  f"{self.left} left")
        self.left -= n
        return self.f.read(n)

    def i32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little", signed=True)

    def cstr(self, n: int, what: str) -> str:
        # the loader builds a C string, so a name ends at its first zero byte
        return self.take(n, what).split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _read_legacy(path: Path, size: int) -> Imatrix:
    """common/imatrix-loader.cpp `common_imatrix_load_legacy` + quantize.cpp `load_imatrix`:
    int32 n_entries, then per entry int32 name length, name, int32 ncall, int32 nval, nval
    float32 sums (= mean * ncall); optional trailer int32 chunk count, int32 length, dataset."""
    values: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        cur = _Cursor(f, size, path)
        n_entries = cur.i32("the entry count")
        if n_entries < 1:
            raise _bad(path, f"not a GGUF file, and as a legacy .dat it has {n_entries} entries")
        # smallest entry: name length, ncall, nval (4 bytes each) and one float
        if n_entries * 16 > cur.left:
            raise _bad(path, f"claims {n_entries} entries, more than its {size} bytes can hold "
                             f"(not an imatrix, or truncated)")
        for i in range(n_entries):
            n_name = cur.i32(f"entry {i + 1}'s name length")
            name = cur.cstr(n_name, f"entry {i + 1}'s name")
            ncall = cur.i32(f"{name}'s call count")
            nval = cur.i32(f"{name}'s value count")
            if nval < 1:
                raise _bad(path, f"{name} has {nval} values")
            sums = np.frombuffer(cur.take(4 * nval, f"{name}'s {nval} values"), "<f4")
            # quantize.cpp: e[i] = entry.sums[i] / ncall (float / int64 -> float division);
            # a later entry of the same name replaces an earlier one (std::map operator[])
            values[name] = (sums / np.float32(ncall) if ncall > 0 else sums) \
                .astype(np.float32, copy=True)
        chunks = dataset = None
        # the trailer is optional and, like llama.cpp, read only as far as it goes
        if cur.left >= 4:
            chunks = cur.i32("the chunk count")
            if cur.left >= 4:
                n = cur.i32("the dataset name length")
                if 0 < n <= cur.left:
                    dataset = cur.cstr(n, "the dataset name")
    return Imatrix(values, chunks, None, [dataset] if dataset is not None else [], legacy=True)


def _check_gguf_header(path: Path, size: int) -> None:
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise _bad(path, f"a GGUF file cut short ({size} bytes, the header alone is 24)")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:
        raise _bad(path, "a GGUF file of the other byte order, which llama.cpp cannot read")
    if version not in (2, 3):
        raise _bad(path, f"GGUF version {version}; llama.cpp reads versions 2 and 3")
    n_tensors = int.from_bytes(head[8:16], "little")
    n_kv = int.from_bytes(head[16:24], "little")
    # smallest key/value: key length, type, one byte; smallest tensor info: name length,
    # dimension count, one dimension, type, offset
    if n_kv * 13 + n_tensors * 32 > size - 24:
        raise _bad(path, f"GGUF header claims {n_tensors} tensors and {n_kv} keys, more than "
                         f"its {size} bytes can hold (truncated or corrupt)")


def _u32(path: Path, fld, uint32) -> int:
    if fld.types != [uint32]:  # llama.cpp's gguf_get_val_u32 aborts on any other type
        raise _bad(path, f"{fld.name} is {[t.name for t in fld.types]}, llama.cpp needs uint32")
    return int(fld.contents())


def _read_gguf(path: Path, size: int) -> Imatrix:
    """imatrix-loader.cpp `common_imatrix_load` + quantize.cpp `load_imatrix`: for each pair
    <name>.in_sum2 (F32, ne0 x n_mat) / <name>.counts (F32, n_mat), count = lround(counts[j]);
    value = in_sum2 / (float) count, or 1 where count <= 0 (an expert that saw no token)."""
    import gguf

    from llmpareto.gguf_check import check_gguf

    _check_gguf_header(path, size)
    check_gguf(path)  # counts, shapes and offsets against the file size, before GGUFReader
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise _bad(path, f"a corrupt GGUF file ({type(e).__name__}: {e})") from None
    fields = reader.fields
    lacks = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if lacks:
        kind = fields.get("general.type")
        kind = f"general.type {kind.contents()!r}" if kind is not None else "no general.type"
        raise _bad(path, f"a GGUF file ({kind}) but not an importance matrix: no "
                         f"{', '.join(lacks)} (llama-quantize: 'missing imatrix metadata')")
    uint32 = gguf.GGUFValueType.UINT32
    chunks, chunk_size = (_u32(path, fields[k], uint32) for k in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
    ds = fields[KEY_DATASETS]
    # llama.cpp takes the datasets only from an array of strings and ignores anything else
    datasets = ds.contents() if ds.types == [gguf.GGUFValueType.ARRAY,
                                             gguf.GGUFValueType.STRING] else []

    pairs: dict[str, list] = {}
    for t in reader.tensors:
        for i, suffix in enumerate((SUM_SUFFIX, COUNT_SUFFIX)):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name[:-len(suffix)], [None, None])[i] = t
    if not pairs:
        raise _bad(path, f"a GGUF file with imatrix keys but no *{SUM_SUFFIX} / *{COUNT_SUFFIX} "
                         f"tensors, so it holds no importance values")
    values = {}
    for name, (sums_t, counts_t) in sorted(pairs.items()):
        if sums_t is None or counts_t is None:
            raise _bad(path, f"{name} has only one of {SUM_SUFFIX} and {COUNT_SUFFIX}")
        for t in (sums_t, counts_t):
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise _bad(path, f"{t.name} is {t.tensor_type.name}, llama.cpp needs F32")
        values[name] = _normalize(path, name, np.asarray(sums_t.data, np.float32).ravel(),
                                  np.asarray(counts_t.data, np.float32).ravel())
    return Imatrix(values, chunks, chunk_size, list(datasets), legacy=False)


def _normalize(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if counts.size == 0 or sums.size == 0 or sums.size % counts.size:
        raise _bad(path, f"{name} has {sums.size} sums for {counts.size} counts (imatrix.cpp "
                         f"writes a non-empty multiple)")
    if not np.isfinite(counts).all():
        raise _bad(path, f"{name} has a non-finite token count")
    # (float) std::lround(counts[j]): halves away from zero, exact in float64 for float32 input
    c64 = counts.astype(np.float64)
    count = (np.sign(c64) * np.floor(np.abs(c64) + 0.5)).astype(np.float32)[:, None]
    s = sums.reshape(counts.size, -1)
    out = np.where(count > 0, s / np.where(count > 0, count, np.float32(1)), np.float32(1))
    return out.astype(np.float32).ravel()


# --- writing ---
def write_imatrix(path: str | os.PathLike, values: Mapping[str, np.ndarray], tokens: int, *,
                  chunk_size: int = 512, chunks: int | None = None,
                  datasets: Sequence[str] = (), legacy: bool = False) -> Path:
    """Write mean-squared activations (GGUF name -> per-column values) over `tokens` calibration
    tokens as llama-imatrix would: GGUF with in_sum2 = mean * tokens, counts = tokens, or the
    legacy .dat with sums = mean * ncall, ncall = ceil(tokens / chunk_size). Atomic."""
    path = Path(path)
    if not values:
        raise UserError(f"imatrix file {path}: no values to write; collect calibration "
                        f"statistics first")
    if tokens < 1:
        raise UserError(f"imatrix file {path}: computed on {tokens} tokens; give calibration "
                        f"text with at least one token")
    if not (0 < chunk_size < 2**31 and tokens < 2**31 * chunk_size and 0 <= (chunks or 0) < 2**31):
        raise UserError(f"imatrix file {path}: chunk_size {chunk_size} (chunks {chunks}) for "
                        f"{tokens} tokens does not fit the file's 32-bit counts; pick a "
                        f"chunk_size of 1 .. 2^31-1")
    chunks = math.ceil(tokens / chunk_size) if chunks is None else chunks
    clean = {name: _checked(path, name, v, legacy) for name, v in values.items()}
    try:
        with atomic.atomic_path(path) as tmp:
            (_write_legacy if legacy else _write_gguf)(tmp, clean, tokens, chunk_size, chunks,
                                                       datasets)
    except UserError as e:
        raise UserError(f"imatrix file {path}: {e}") from None
    return path


def _checked(path: Path, name: str, v, legacy: bool) -> np.ndarray:
    if not name.endswith(".weight"):
        raise UserError(f"imatrix file {path}: {name} is not a llama.cpp tensor name such as "
                        f"blk.0.attn_q.weight; map module names with to_gguf_names() first")
    if not legacy and len((name + SUM_SUFFIX).encode()) >= GGML_MAX_NAME:
        raise UserError(f"imatrix file {path}: {name}{SUM_SUFFIX} is longer than llama.cpp's "
                        f"{GGML_MAX_NAME - 1}-byte tensor names; write it with legacy=True")
    a = np.asarray(v, dtype=np.float32)
    if a.ndim != 1 or a.size == 0:
        raise UserError(f"imatrix file {path}: {name} has shape {a.shape}, expected one value "
                        f"per input column")
    if not np.isfinite(a).all() or (a < 0).any():
        raise UserError(f"imatrix file {path}: {name} has negative or non-finite mean squared "
                        f"activations (llama-quantize refuses those); check the calibration run")
    return a


def _write_gguf(tmp: Path, values: dict[str, np.ndarray], tokens: int, chunk_size: int,
                chunks: int, datasets: Sequence[str]) -> None:
    import gguf

    count = np.float32(tokens)
    # no architecture: imatrix.cpp writes none (an empty arch string adds no key)
    w = gguf.GGUFWriter(tmp, arch="")
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(KEY_DATASETS, [str(d) for d in datasets] or [DEFAULT_DATASET])
    w.add_uint32(KEY_CHUNK_COUNT, chunks)
    w.add_uint32(KEY_CHUNK_SIZE, chunk_size)
    for name in sorted(values):  # imatrix.cpp sorts names too
        # 1-D like ggml writes a (n, 1) tensor: ggml_n_dims drops trailing ones
        w.add_tensor(name + SUM_SUFFIX, values[name] * count)
        w.add_tensor(name + COUNT_SUFFIX, np.array([count], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_legacy(tmp: Path, values: dict[str, np.ndarray], tokens: int, chunk_size: int,
                  chunks: int, datasets: Sequence[str]) -> None:
    def i32(n: int) -> bytes:
        return int(n).to_bytes(4, "little", signed=True)

    # imatrix.cpp save_imatrix_legacy: ceiling division to avoid accidental zeros
    ncall = (tokens + chunk_size - 1) // chunk_size
    with open(tmp, "wb") as f:
        f.write(i32(len(values)))
        for name in sorted(values):
            b = name.encode()
            f.write(i32(len(b)) + b + i32(ncall) + i32(values[name].size))
            f.write((values[name] * np.float32(ncall)).astype("<f4").tobytes())
        dataset = (datasets[-1] if datasets else "").encode()
        f.write(i32(chunks) + i32(len(dataset)) + dataset)


# --- names, model checks, our statistics ---
def _gguf_of(fqn: str, n_blocks: int, gguf_arch: str = "llama") -> str | None:
    """GGUF weight name of a module (or parameter) name, None when llama.cpp has none."""
    from llmpareto.families import gguf_name

    try:
        return gguf_name(fqn if fqn.endswith(".weight") else fqn + ".weight", n_blocks, gguf_arch)
    except UserError:
        return None


def _values(imatrix: Imatrix | Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    return imatrix.values if isinstance(imatrix, Imatrix) else imatrix


def to_modules(imatrix: Imatrix | Mapping[str, np.ndarray], fqns: Iterable[str],
               n_blocks: int, gguf_arch: str = "llama") -> dict[str, np.ndarray]:
    """GGUF-named values -> {module name: values} for the given modules that have an entry
    (columns need no reordering: llama.cpp permutes only q/k rows)."""
    values = _values(imatrix)
    names = {fqn: _gguf_of(fqn, n_blocks, gguf_arch) for fqn in fqns}
    return {fqn: values[name] for fqn, name in names.items() if name in values}


def to_gguf_names(values_by_fqn: Mapping[str, np.ndarray], n_blocks: int,
                  gguf_arch: str = "llama") -> dict[str, np.ndarray]:
    """{module name: values} -> {GGUF tensor name: values}, ready for write_imatrix."""
    out: dict[str, np.ndarray] = {}
    for fqn, v in values_by_fqn.items():
        name = _gguf_of(fqn, n_blocks, gguf_arch)
        if name is None:
            raise UserError(f"imatrix: module {fqn} has no llama.cpp tensor name ({gguf_arch} "
                            f"models with {n_blocks} blocks); leave it out of the imatrix")
        out[name] = v
    return out


def _blocks_of(fqns: Iterable[str]) -> int:
    found = [int(m.group(1)) for f in fqns if (m := re.search(r"\.layers\.(\d+)\.", f))]
    return max(found, default=-1) + 1


def check_imatrix(imatrix: Imatrix | Mapping[str, np.ndarray],
                  shapes: Mapping[str, tuple[int, int]], path: str | os.PathLike, *,
                  n_blocks: int | None = None, requires: Iterable[str] = (),
                  gguf_arch: str = "llama") -> list[str]:
    """Whether an imatrix (GGUF names, or module names) fits this model, whose linear weights
    are `shapes` ({module: (rows, cols)}, every one of them). Returns the modules it has no
    values for, which llama-quantize quantizes without one; raises UserError for a file made
    for another model, and for a missing module listed in `requires` (llama.cpp needs one for
    IQ1_S/IQ1_M/IQ2_*/IQ3_XXS, and Q2_K in a Q2_K_S file)."""
    values = _values(imatrix)
    n_blocks = _blocks_of(shapes) if n_blocks is None else n_blocks
    by_gguf = {g: fqn for fqn in shapes
               if (g := _gguf_of(fqn, n_blocks, gguf_arch)) is not None}
    where = f"--imatrix {path}"
    fix = "use --imatrix on to compute one for this model"
    foreign, used = [], {}
    for name, v in values.items():
        fqn = name if name in shapes else by_gguf.get(name)
        if fqn is None:
            foreign.append(name)
            continue
        v = np.asarray(v)
        cols = shapes[fqn][1]
        if v.size != cols:
            if (name if name in by_gguf else _gguf_of(fqn, n_blocks, gguf_arch)) \
                    == "token_embd.weight":
                continue  # llama-quantize ignores a mismatched token_embd entry
            raise UserError(f"{where}: made for another model: {name} has {v.size} values, "
                            f"this model's has {cols} input columns; {fix}")
        if not np.isfinite(v).all():
            raise UserError(f"{where}: {name} has non-finite values, which llama-quantize "
                            f"refuses; {fix}")
        used[fqn] = name
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"{where}: made for another model: {', '.join(sorted(foreign)[:3])}"
                        f"{more} match no tensor of this model ({n_blocks} blocks); {fix}")
    missing = [fqn for fqn in shapes if fqn not in used]
    needed = [fqn for fqn in requires if fqn not in used]
    if needed:
        raise UserError(f"{where}: has no values for {', '.join(needed[:3])}, which "
                        f"llama-quantize needs for very-low-bit types; {fix}")
    return missing


def imatrix_from_stats(stats: Mapping[str, object]) -> dict[str, np.ndarray]:
    """{module: InputStats} -> {module: mean squared activation per input column}, float32:
    diag(xtx) / tokens, what llama-imatrix computes (sum of x^2 over tokens / token count)."""
    out = {}
    for fqn, s in stats.items():
        x = s.xtx
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        if x.ndim == 2 and x.shape[0] == x.shape[1]:
            x = np.diagonal(x)
        elif x.ndim != 1:
            raise UserError(f"imatrix: statistics of {fqn} have shape {x.shape}, expected "
                            f"(cols,) or (cols, cols); collect them again")
        if s.tokens < 1:
            raise UserError(f"imatrix: {fqn} saw no calibration tokens; give calibration text "
                            f"that reaches it")
        out[fqn] = (x.astype(np.float64) / s.tokens).astype(np.float32)
    return out
