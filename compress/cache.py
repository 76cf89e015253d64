"""Prepared-variant cache: each (tensor, format[, sparsity]) is prepared once per run
(EvoPress-style). A pruned variant is pruned from the base weights (never from another
variant: its result does not depend on other modules' choices), then quantized.

Two levels, both bounded, least recently used dropped first. Prepared variants, up to
`packed_bytes`: packed codes (the exact bytes a GGUF file stores, about params x bits/8 a
format) and pruned float32 weights (params x 4 bytes a (pattern, level)). Dequantized float32
variants, up to `dense_bytes`, so a trial that reuses one swaps a tensor pointer instead of
dequantizing again. A variant dropped from either level is made again, identically, when asked
for (pruning and quantizing are deterministic); `remade` counts how often that happened.

On a CUDA model (docs/gpus-and-memory.md): variants are quantized and pruned on the
host from float32 copies of one tensor at a time; packed codes then live in GPU memory up to
`device_bytes`, the rest in pinned host memory, and are dequantized on the GPU by the torch
dequantizers; dense variants live on the GPU in the model's dtype.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch

from llmpareto.arch import Arch
from llmpareto.compress.dequant import dequantize_torch
from llmpareto.compress.quantizers import DiskVariants, Quantizer
from llmpareto.formats import get_format
from llmpareto.placement import release_freed_host_memory

DEFAULT_DENSE_BYTES = 4 * 10**9  # all 7 GGUF variants of a 135M model fit
TRIM_BYTES = 256 * 2**20  # variants dropped between two hand-backs of freed host memory
DEFAULT_PACKED_BYTES = 4 * 10**9  # 7 GGUF formats (0.8 GB) + 7 pruned levels (3 GB) of 135M


class VariantCache:
    """Base weights of one model plus its prepared (tensor, format) variants."""

    def __init__(self, model: torch.nn.Module, arch: Arch,
                 dense_bytes: int = DEFAULT_DENSE_BYTES,
                 packed_bytes: int = DEFAULT_PACKED_BYTES, device_bytes: int = 0) -> None:
        self.model = model
        self.arch = arch
        self.shapes = {t.fqn: (t.rows, t.cols) for t in arch.tensors}
        # Found once by name: dropping blocks renames modules, the Parameters stay the same.
        self.params = {fqn: model.get_submodule(fqn).weight for fqn in self.shapes}
        # Trials re-point the model's parameters at variants, so the base weights are kept
        # here (the tensors the model was loaded with, not copies).
        self.base: dict[str, torch.Tensor] = {
            fqn: self.weight(fqn).detach() for fqn in self.shapes
        }
        # ("codes", fqn, fmt[, pattern, level]) -> packed codes (np.uint8 / f16 / f32 array);
        # ("pruned", fqn, pattern, level) -> pruned float32 weights; one LRU for both
        self.prepared: OrderedDict[tuple, np.ndarray | torch.Tensor] = OrderedDict()
        self.packed_bytes, self._packed_used = int(packed_bytes), 0
        first = next(iter(self.base.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None else torch.float32
        # packed codes of a CUDA model held on the GPU (the rest pinned on the host)
        self.device_bytes, self._device_used = int(device_bytes), 0
        self._on_device: set[tuple] = set()
        self._made: set[tuple] = set()  # every key prepared once, to count re-makes
        self.remade = 0
        self.dense: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.dense_bytes = int(dense_bytes)
        self._dense_used = 0
        self._dropped = 0  # bytes dropped since the freed memory was last handed back
        self.current: dict[str, str | None] = {fqn: None for fqn in self.shapes}
        self.current_sparsity: dict[str, tuple[str, float] | None] = dict.fromkeys(self.shapes)
        self.current_slice: dict[str, tuple | None] = dict.fromkeys(self.shapes)  # (key, rows, cols)
        # students: each block's down_proj and o_proj input column norms on calibration text
        # (set_importance), which decide the MLP channels and attention groups kept
        self.importance: dict[str, torch.Tensor] = {}
        self._slices: dict[tuple, dict] = {}
        self.override: dict[str, torch.Tensor] = {}  # set_override: distilled weights
        self.exact: set[str] = set()  # override tensors already on their grids (recovered)
        self.packed_override: dict[str, tuple[str, np.ndarray]] = {}  # their blocks as learned
        self.modules = {fqn: model.get_submodule(fqn) for fqn in self.shapes}
        # biases (Qwen2's q/k/v): a student keeps the entries of the rows it keeps
        self.base_bias = {fqn: m.bias.detach().clone() for fqn, m in self.modules.items()
                          if getattr(m, "bias", None) is not None}
        cfg = model.config
        self.base_config = {k: getattr(cfg, k) for k in
                            ("intermediate_size", "num_attention_heads", "num_key_value_heads")
                            if hasattr(cfg, k)}
        # how pruned variants are made: a method of compress.prune.PRUNERS, and the base
        # model's calibration statistics per module when the method needs them
        self.pruning_method = "magnitude"
        self.input_stats: dict = {}
        # Parameters keep their identity when a trial re-points their data, and when blocks
        # are dropped their names shift; this maps each searched weight back to its tensor.
        self.fqn_of_param = {id(self.weight(fqn)): fqn for fqn in self.shapes}
        inner = getattr(model, "model", None)
        self.all_layers = list(getattr(inner, "layers", []) or [])
        self.n_layers = len(self.all_layers)
        self.layer_types = list(getattr(model.config, "layer_types", None) or [])
        self.prepare_seconds = 0.0
        self.hits = self.misses = 0
        # how packed variants are made (compress.quantizers), and where calibrated ones are
        # kept between runs (None: not on disk)
        self.quantizer = Quantizer()
        self.disk: DiskVariants | None = None

    def set_quantizer(self, quantizer: Quantizer, disk: DiskVariants | None = None) -> None:
        """Quantize with `quantizer` from now on (packed variants made before are dropped)."""
        self.quantizer, self.disk = quantizer, disk
        self._drop(lambda k: k[0] == "codes", lambda k: k[1] is not None)
        self._made = {k for k in self._made if k[0] != "codes"}

    def fingerprint(self) -> str:
        """sha256 of the base weights of every searched tensor (names, shapes and bytes); the
        base weights never change, so it is hashed once (the disk key and presets both ask)."""
        import hashlib

        if getattr(self, "_fingerprint", None):
            return self._fingerprint
        h = hashlib.sha256()
        for fqn in sorted(self.base):
            t = self.base[fqn].contiguous()
            h.update(f"{fqn}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).cpu().numpy())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def weight(self, fqn: str) -> torch.nn.Parameter:
        return self.params[fqn]

    def pruned_modules(self) -> dict[str, tuple[str, float]]:
        """Module name (as the model now names it: blocks renumber when a student drops some)
        -> (pattern, level) of every pruned tensor the model holds now."""
        out = {}
        for name, p in self.model.named_parameters():
            fqn = self.fqn_of_param.get(id(p))
            if fqn is not None and self.current_sparsity.get(fqn) is not None:
                out[name.removesuffix(".weight")] = self.current_sparsity[fqn]
        return out

    @staticmethod
    def _key(fqn: str, fmt: str | None, sparsity: tuple[str, float] | None,
             sl: tuple | None = None) -> tuple:
        """(fqn, format, sparsity, slice key): one variant; the slice key names the student
        shape a narrowed tensor was cut to (compress.restructure.slices_for)."""
        return (fqn, fmt, sparsity, None if sl is None else sl[0])

    def set_pruning(self, method: str, input_stats: dict | None = None) -> None:
        """Prune with `method` from now on (pruned variants made before are dropped)."""
        self.pruning_method, self.input_stats = method, dict(input_stats or {})
        self._drop(lambda k: k[3] is not None, lambda k: k[2] is not None)
        self._made = {k for k in self._made if k[3] is None}

    def set_importance(self, col_norms: dict[str, torch.Tensor]) -> None:
        """Input column norms (down_proj, o_proj) that decide what a narrower student keeps."""
        self.importance = dict(col_norms)
        self._slices.clear()

    def slices(self, structure: dict | None) -> dict[str, tuple]:
        """fqn -> (key, rows, cols) of every tensor `structure` narrows (memoized)."""
        from llmpareto.compress.restructure import slices_for
        from llmpareto.structure import cut_key

        key = cut_key(structure)
        if key not in self._slices:
            a = self.arch
            kinds = {t.fqn: t.kind for t in a.linears}
            layers = {t.fqn: t.layer for t in a.linears}
            self._slices[key] = slices_for(dict(key), self.shapes, kinds, layers, a.n_kv_heads,
                                           a.head_dim, self.importance) if key else {}
        return self._slices[key]

    def set_override(self, weights: dict[str, torch.Tensor], exact: bool = False,
                     packed: dict[str, tuple[str, np.ndarray]] | None = None) -> None:
        """Use these float32 weights (a distilled student's: already cut to its shape and
        pruned; or recovered weights) instead of the base model's for their tensors; their
        variants are remade. `exact`: the weights already lie on their formats' grids
        (block-wise reconstruction) and are packed by the format's own round-to-nearest, which
        must give them back bit for bit, never by the run's quantizer; `packed`: tensor ->
        (format, blocks) written as they are (K-quant codes learned onto their scales). An
        empty dict returns to the base weights."""
        touched = set(self.override) | set(weights)
        self.override = dict(weights)
        self.exact = set(weights) if exact else set()
        self.packed_override = dict(packed or {})
        self._drop(lambda k: k[1] in touched, lambda k: k[0] in touched)
        self.current.update(dict.fromkeys(touched, "?"))  # so apply() sets them again

    def source(self, fqn: str, sl: tuple | None = None) -> torch.Tensor:
        """The base weights of `fqn`, cut to a student's rows and columns when `sl` is set
        (a distilled student's weights, when set_override gave them)."""
        from llmpareto.compress.restructure import slice_weight

        if fqn in self.override:
            return self.override[fqn]
        return self.base[fqn] if sl is None else slice_weight(self.base[fqn], sl[1], sl[2])

    def host_source(self, fqn: str, sl: tuple | None = None) -> torch.Tensor:
        """`source` as float32 on the host, what the quantizers and pruners read: the tensor
        itself for a float32 CPU model, else a copy of this one tensor (memory stays bounded)."""
        w = self.source(fqn, sl)
        return w if w.device.type == "cpu" and w.dtype == torch.float32 else \
            w.to("cpu", torch.float32)

    def _stats(self, fqn: str, sl: tuple | None):
        """Calibration statistics of `fqn`'s inputs, cut to the kept input columns."""
        stats = self.input_stats.get(fqn)
        if stats is None or sl is None or sl[2] is None:
            return stats
        from llmpareto.compress.prune import InputStats

        cols = sl[2]
        xtx = stats.xtx[cols] if stats.xtx.dim() == 1 else stats.xtx[cols][:, cols]
        return InputStats(xtx, stats.tokens)

    def pruned(self, fqn: str, sparsity: tuple[str, float], sl: tuple | None = None) -> torch.Tensor:
        """float32 base weights of `fqn` (cut to `sl`) pruned to `sparsity` (pattern, level),
        made once and kept while the bound allows; quantizing into several formats prunes once."""
        from llmpareto.compress.prune import prune

        if fqn in self.override:  # distilled with its pruning mask held: already pruned
            return self.override[fqn]
        key = ("pruned", *self._key(fqn, None, sparsity, sl))
        if key in self.prepared:
            self.prepared.move_to_end(key)
            return self.prepared[key]
        t0 = time.perf_counter()
        pattern, level = sparsity
        w = prune(self.host_source(fqn, sl), self.pruning_method, 0.0 if ":" in pattern else level,
                  pattern, self._stats(fqn, sl))
        self.prepare_seconds += time.perf_counter() - t0
        self._keep(key, w)
        return w

    def get(self, fqn: str, fmt: str, sparsity: tuple[str, float] | None = None,
            sl: tuple | None = None) -> np.ndarray:
        """Packed variant of tensor `fqn` in format `fmt` (cut to `sl`, then pruned when
        `sparsity` is set), prepared on first use; on the host, wherever it is kept."""
        return _numpy(self._packed(fqn, fmt, sparsity, sl))

    def _packed(self, fqn: str, fmt: str, sparsity: tuple[str, float] | None = None,
                sl: tuple | None = None) -> np.ndarray | torch.Tensor:
        """`get`'s variant as it is kept: a numpy array, or for a CUDA model a tensor on the
        GPU or in pinned memory (no copy back to the host on the hot path)."""
        key = ("codes", *self._key(fqn, fmt, sparsity, sl))
        if key in self.prepared:
            self.prepared.move_to_end(key)
            return self.prepared[key]
        disk_key = (key, self.pruning_method if sparsity else None)
        on_disk = (self.disk is not None and fqn not in self.override
                   and self.quantizer.calibrates(fmt))
        out = self.disk.load(disk_key) if on_disk else None
        if out is None:
            src = self.host_source(fqn, sl) if sparsity is None else \
                self.pruned(fqn, sparsity, sl)
            t0 = time.perf_counter()
            if self.packed_override.get(fqn, (None,))[0] == fmt:
                out = self.packed_override[fqn][1]
            elif fqn in self.exact:
                out = _on_grid(fqn, fmt, src)
            else:
                out = self.quantizer.quantize(fqn, fmt, src, None if sl is None else sl[2])
            if sparsity is not None and self.quantizer.name == "gptq":
                # GPTQ's compensation reaches pruned positions: put their zeros back
                # (approximate; SparseGPT's joint pruning + quantization is not done here)
                f = get_format(fmt)
                w = torch.from_numpy(f.dequantize(out, tuple(src.shape))).masked_fill(src == 0, 0.0)
                out = f.quantize(w.numpy())
            self.prepare_seconds += time.perf_counter() - t0
            if on_disk:
                self.disk.save(disk_key, out)
        self._keep(key, out)
        return self.prepared.get(key, out)  # placed on the GPU or pinned, if kept

    def _keep(self, key: tuple, value) -> None:
        """Remember a prepared variant, dropping the least recently used past packed_bytes;
        a CUDA model's packed codes go to the GPU while device_bytes allow, else pinned."""
        self.remade += key in self._made
        self._made.add(key)
        size = _size(value)
        if size > self.packed_bytes:
            return
        while self._packed_used + size > self.packed_bytes:
            self._pop(next(iter(self.prepared)))
        if self.device.type == "cuda" and key[0] == "codes":
            on_device = self._device_used + size <= self.device_bytes
            value = place_packed(value, self.device if on_device else None)
            if on_device:
                self._on_device.add(key)
                self._device_used += size
        self.prepared[key] = value
        self._packed_used += size

    def _pop(self, key: tuple):
        value = self.prepared.pop(key)
        size = _size(value)
        self._packed_used -= size
        self._released(size)
        if key in self._on_device:
            self._on_device.discard(key)
            self._device_used -= size
        return value

    def _drop(self, prepared_if, dense_if) -> None:
        """Forget the prepared and dense variants the two predicates pick (by key)."""
        for key in [k for k in self.prepared if prepared_if(k)]:
            self._pop(key)
        for key in [k for k in self.dense if dense_if(k)]:
            size = _size(self.dense.pop(key))
            self._dense_used -= size
            self._released(size)

    @property
    def device_nbytes(self) -> int:
        """Bytes of packed codes held on the GPU (0 for a CPU model)."""
        return self._device_used

    def prepare_pruned(self, items: Iterable[tuple[str, tuple[str, float]]],
                       progress=None) -> int:
        """Prune every (fqn, (pattern, level)) now, while they fit in packed_bytes (the rest
        are made on first use); returns how many were made."""
        made = 0
        for fqn, sparsity in items:
            rows, cols = self.shapes[fqn]  # unpruned students' shapes: made on first use
            if self._packed_used + 4 * rows * cols > self.packed_bytes:
                break
            self.pruned(fqn, sparsity)
            made += 1
            if progress is not None:
                progress.update(1)
        return made

    def prepare(self, pairs: Iterable[tuple[str, str]], progress=None) -> None:
        """Quantize every pair now; also fill the dense level while it has room, so the
        first trials swap pointers instead of dequantizing on the hot path."""
        for fqn, fmt in pairs:
            self._packed(fqn, fmt)
            size = self.dtype.itemsize * self.shapes[fqn][0] * self.shapes[fqn][1]
            if (self._key(fqn, fmt, None) not in self.dense
                    and self._dense_used + size <= self.dense_bytes):
                self.dequantized(fqn, fmt)
            if progress is not None:
                progress.update(1)

    def dequantized(self, fqn: str, fmt: str | None, sparsity: tuple[str, float] | None = None,
                    sl: tuple | None = None) -> torch.Tensor:
        """float32 weights of `fqn` in format `fmt` (None: the base weights), cut to a
        student's shape when `sl` is set, pruned when `sparsity` is set (then a format is
        required). Do not modify."""
        from llmpareto.compress.restructure import narrowed_shape

        if fmt is None and sparsity is not None:
            raise ValueError(f"{fqn}: a pruned variant needs a stored format")
        if fmt is None and sl is None and fqn not in self.override:
            return self.base[fqn]
        key = self._key(fqn, fmt, sparsity, sl)
        if key in self.dense:
            self.hits += 1
            self.dense.move_to_end(key)
            return self.dense[key]
        self.misses += 1
        if fmt is None:  # the base weights cut to the student's shape
            out = self.source(fqn, sl)
            self._remember(key, out)
            return out
        packed = self._packed(fqn, fmt, sparsity, sl)
        shape = narrowed_shape(*self.shapes[fqn], sl)
        out = dequantize_torch(fmt, packed, shape, self.device)
        if out is None:  # formats without a torch path use the reference numpy one
            out = torch.from_numpy(get_format(fmt).dequantize(_numpy(packed), shape))
        out = out.to(self.device, self.dtype)  # exact for float32; the model's dtype otherwise
        self._remember(key, out)
        return out

    def _remember(self, key: tuple, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.dense_bytes:
            return
        while self._dense_used + size > self.dense_bytes:
            _, old = self.dense.popitem(last=False)
            self._dense_used -= _size(old)
            self._released(_size(old))
        self.dense[key] = t
        self._dense_used += size

    def _released(self, size: int) -> None:
        """Count bytes dropped; past TRIM_BYTES, hand the freed host memory back (without it
        the process grows past the bounds: llmpareto.placement.release_freed_host_memory)."""
        self._dropped += size
        if self._dropped >= TRIM_BYTES:
            self._dropped = 0
            release_freed_host_memory()

    @property
    def nbytes(self) -> int:
        """Bytes held by prepared variants: packed codes and pruned weights (base weights and
        the dense LRU not counted); at most packed_bytes."""
        return self._packed_used


def place_packed(codes: np.ndarray, device: torch.device | None) -> torch.Tensor:
    """Packed codes as a tensor on `device`, or in pinned host memory (None), from where the
    GPU reads them without a staging copy."""
    t = torch.from_numpy(np.ascontiguousarray(codes))
    return t.to(device) if device is not None else t.pin_memory()


def _numpy(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.cpu().numpy()


def _size(value) -> int:
    return int(value.nbytes) if isinstance(value, np.ndarray) else value.numel() * \
        value.element_size()


def _on_grid(fqn: str, fmt: str, w: torch.Tensor) -> np.ndarray:
    """Weights that lie on `fmt`'s grid, packed by the format's own quantizer: the packed
    bytes hold exactly these weights (checked), so what is scored is what is exported."""
    f = get_format(fmt)
    arr = w.detach().to("cpu", torch.float32).numpy()
    out = f.quantize(arr)
    if not np.array_equal(f.dequantize(out, arr.shape), arr):
        raise RuntimeError(f"{fqn}: recovered weights are not a fixed point of {fmt}'s "
                           "quantizer; this is a bug in llmpareto, please report it")
    return out
