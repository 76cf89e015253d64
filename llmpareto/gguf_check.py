"""GGUF files from strangers, checked before anything is sized from what they claim.

The header (key/values, tensor infos) is parsed here with `struct` on bounded reads: every
count, length, shape and offset is checked against the file size before it is used, so a file
that claims a 1 TB tensor or a 2**62-byte string is refused in milliseconds and kilobytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from llmpareto.errors import UserError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what llama.cpp reads (v1 had 32-bit counts and is gone)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_BYTES = 2**16 - 1  # the GGUF spec's limit on a key
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT, when general.alignment is absent
INT64_MAX = 2**63 - 1  # ggml counts elements and bytes in int64
# No model comes near a million tensors or keys (a 405B Llama has ~1,100 tensors); a claim of
# more is a corrupt file, and refusing it bounds the time and memory of this check.
MAX_ENTRIES = 2**20
# The fewest bytes an entry can take: key/value = key length (8) + type (4) + a 1-byte value;
# tensor info = name length (8) + n_dims (4) + type (4) + offset (8), with no dimension.
MIN_KV_BYTES, MIN_TENSOR_BYTES = 13, 24
_WINDOW = 1 << 20  # bytes read at a time while skipping string arrays
_FIX = "re-download it, or convert the model again (llama.cpp's convert_hf_to_gguf.py)"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    ggml_type: int
    offset: int  # from the start of the data section
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    alignment: int
    data_start: int  # byte where the data section begins
    file_bytes: int
    tensors: tuple[TensorInfo, ...]

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def _bad(path, problem: str) -> UserError:
    return UserError(f"GGUF file {path}: {problem}; the file is truncated, corrupt or not a GGUF "
                     f"model: {_FIX}")


class _Reader:
    """Little-endian reads from a file; nothing is read or skipped past its end."""

    def __init__(self, f, size: int, path) -> None:
        self.f, self.size, self.path, self.pos = f, size, path, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def _room(self, n: int, what: str) -> None:
        if n > self.left:
            raise _bad(self.path, f"{what} needs {n} bytes at byte {self.pos}, but the file "
                                  f"ends {self.left} bytes later (at {self.size})")

    def take(self, n: int, what: str) -> bytes:
        self._room(n, what)
        data = self.f.read(n)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._room(n, what)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str, cap: int) -> str:
        n = self.u64(f"the length of {what}")
        if n > cap:
            raise _bad(self.path, f"{what} at byte {self.pos - 8} claims {n} bytes, more than "
                                  f"the {cap} allowed")
        return self.take(n, what).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        self.skip(self.u64(f"the length of {what}"), what)

    def skip_strings(self, count: int, what: str) -> None:
        """`count` strings, read a window at a time: a 49k-token vocabulary in milliseconds."""
        buf, at = b"", 0  # buf holds the file from byte self.pos - at on
        for i in range(count):
            if len(buf) - at < 8:
                have = len(buf) - at
                buf, at = buf[at:] + self.f.read(min(_WINDOW, self.left - have)), 0
                if len(buf) < 8:
                    raise _bad(self.path, f"the length of string {i} of {what} needs 8 bytes at "
                                          f"byte {self.pos}, but the file ends at {self.size}")
            n = struct.unpack_from("<Q", buf, at)[0]
            at, self.pos = at + 8, self.pos + 8
            if n > self.size - self.pos:
                self._room(n, f"string {i} of {what}")
            self.pos += n
            if at + n <= len(buf):
                at += n
            else:
                self.f.seek(self.pos)
                buf, at = b"", 0
        self.f.seek(self.pos)


def _scalar_sizes() -> dict[int, int]:
    from gguf import GGUFValueType as V

    return {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4,
            V.INT32: 4, V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}


def _skip_value(r: _Reader, vtype: int, key: str, sizes: dict[int, int]) -> None:
    from gguf import GGUFValueType as V

    if vtype in sizes:
        r.skip(sizes[vtype], f"the value of {key!r}")
    elif vtype == V.STRING:
        r.skip_string(f"the string value of {key!r}")
    elif vtype == V.ARRAY:
        itype, count = r.u32(f"the array type of {key!r}"), r.u64(f"the array length of {key!r}")
        if itype in sizes:
            r.skip(count * sizes[itype], f"the {count}-element array {key!r}")
        elif itype == V.STRING:
            if count * 8 > r.left:  # each string has at least its 8-byte length
                raise _bad(r.path, f"key {key!r} claims an array of {count} strings, more than "
                                   f"the {r.left} bytes left can hold")
            r.skip_strings(count, repr(key))
        else:  # llama.cpp reads no arrays of arrays
            raise _bad(r.path, f"key {key!r} has an array of value type {itype}, which llama.cpp "
                               "does not read")
    else:
        raise _bad(r.path, f"key {key!r} has value type {vtype}, not a GGUF type (0-12)")


def _read_kv(r: _Reader, n_kv: int) -> int:
    """Skip the key/values; returns general.alignment (or the default)."""
    from gguf import GGUFValueType as V

    sizes, alignment = _scalar_sizes(), DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = r.string(f"key {i}", MAX_KEY_BYTES)
        vtype = r.u32(f"the type of key {key!r}")
        if key == "general.alignment":
            if vtype != V.UINT32:  # llama.cpp's gguf_get_val_u32 needs exactly this
                raise _bad(r.path, f"general.alignment has value type {vtype}, not uint32")
            alignment = r.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _bad(r.path, f"general.alignment {alignment} is not a power of two")
        else:
            _skip_value(r, vtype, key, sizes)
    return alignment


def _read_tensor_info(r: _Reader, i: int) -> tuple[str, tuple[int, ...], int, int]:
    name = r.string(f"the name of tensor {i}", MAX_KEY_BYTES)
    n_dims = r.u32(f"the dimension count of {name!r}")
    if n_dims > MAX_DIMS:
        raise _bad(r.path, f"tensor {name!r} claims {n_dims} dimensions; ggml has at most "
                           f"{MAX_DIMS}")
    shape = tuple(r.u64(f"dimension {d} of {name!r}") for d in range(n_dims))
    return name, shape, r.u32(f"the type of {name!r}"), r.u64(f"the offset of {name!r}")


def _tensor(r: _Reader, name: str, shape: tuple[int, ...], qtype: int, offset: int,
            alignment: int) -> TensorInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    n = 1
    for d in shape:
        if d == 0:
            raise _bad(r.path, f"tensor {name!r} has shape {list(shape)} with a zero dimension")
        n *= d
        if n > INT64_MAX:
            raise _bad(r.path, f"tensor {name!r} claims shape {list(shape)}, more than 2**63 "
                               "elements")
    if qtype not in {int(t) for t in GGML_QUANT_SIZES}:
        raise _bad(r.path, f"tensor {name!r} has GGML type {qtype}, which this gguf package "
                           "does not know (upgrade gguf, or the type was removed from llama.cpp)")
    block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    if shape and shape[0] % block:
        raise _bad(r.path, f"tensor {name!r}: its first dimension {shape[0]} is not a multiple "
                           f"of the {block}-element blocks of {GGMLQuantizationType(qtype).name}")
    if offset % alignment:
        raise _bad(r.path, f"tensor {name!r} has offset {offset}, not a multiple of the "
                           f"alignment {alignment}")
    return TensorInfo(name, shape, qtype, offset, n // block * type_bytes)


def _check_layout(path, tensors: list[TensorInfo], data_start: int, size: int) -> None:
    end_seen, prev = 0, None
    for t in sorted(tensors, key=lambda t: t.offset):
        end = data_start + t.offset + t.n_bytes
        if end > size:
            raise _bad(path, f"tensor {t.name!r} ({t.n_elements} elements, {t.n_bytes} bytes at "
                             f"data offset {t.offset}) ends at byte {end}, past the end of the "
                             f"{size}-byte file")
        if prev is not None and t.offset < end_seen:
            raise _bad(path, f"tensors {prev.name!r} and {t.name!r} overlap (data offsets "
                             f"{prev.offset} and {t.offset})")
        end_seen, prev = max(end_seen, t.offset + t.n_bytes), t


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The validated header of a GGUF file; UserError (file, problem, what to do) otherwise."""
    try:
        f = open(path, "rb", buffering=1 << 16)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UserError(f"GGUF file {path}: cannot open it ({exc.strerror}); check the path")\
            from None
    with f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, size, path)
        magic = r.take(4, "the magic number 'GGUF'")
        if magic != MAGIC:
            raise _bad(path, f"it starts with {magic!r}, not the magic b'GGUF'")
        version = r.u32("the version")
        if version not in VERSIONS and struct.unpack(">I", struct.pack("<I", version))[0] \
                in VERSIONS:
            raise _bad(path, "it is a big-endian GGUF, which llama.cpp on this machine cannot "
                             "read")
        if version not in VERSIONS:
            raise _bad(path, f"GGUF version {version}; llama.cpp reads versions 2 and 3")
        n_tensors, n_kv = r.u64("the tensor count"), r.u64("the key/value count")
        if (n_tensors > MAX_ENTRIES or n_kv > MAX_ENTRIES
                or n_tensors * MIN_TENSOR_BYTES + n_kv * MIN_KV_BYTES > r.left):
            raise _bad(path, f"it claims {n_tensors} tensors and {n_kv} keys, more than its "
                             f"{size} bytes can hold (at most {MAX_ENTRIES} of each are read)")
        alignment = _read_kv(r, n_kv)
        infos = [_read_tensor_info(r, i) for i in range(n_tensors)]
        seen: set[str] = set()
        for name, *_ in infos:
            if name in seen:
                raise _bad(path, f"tensor name {name!r} appears twice")
            seen.add(name)
        tensors = [_tensor(r, *info, alignment) for info in infos]
        data_start = -(-r.pos // alignment) * alignment
    _check_layout(path, tensors, data_start, size)
    return GGUFHeader(str(path), version, alignment, data_start, size, tuple(tensors))


def check_gguf(path: str | os.PathLike) -> None:
    """Raise UserError unless `path` is a GGUF file whose header llama.cpp could read and whose
    tensors all lie inside the file; reads the header only, allocates nothing it claims."""
    read_header(Path(path))
