"""Prepared-variant cache: each (tensor, format) is quantized once per run (EvoPress-style).

Two levels, both bounded: every variant is held as its packed codes (the exact bytes a GGUF
file stores), about params x sum(bits per weight)/8 over the formats used; the most recently
used variants are also kept dequantized (float32) up to `dense_bytes`, so a trial that reuses
one swaps a tensor pointer instead of dequantizing again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch

from llmpareto.arch import Arch
from llmpareto.compress.dequant import dequantize_torch
from llmpareto.formats import get_format

DEFAULT_DENSE_BYTES = 4 * 10**9  # all 7 GGUF variants of a 135M model fit


class VariantCache:
    """Base weights of one model plus its prepared (tensor, format) variants."""

    def __init__(self, model: torch.nn.Module, arch: Arch,
                 dense_bytes: int = DEFAULT_DENSE_BYTES) -> None:
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
        self.packed: dict[tuple[str, str], np.ndarray] = {}
        self.dense: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.dense_bytes = int(dense_bytes)
        self._dense_used = 0
        self.current: dict[str, str | None] = {fqn: None for fqn in self.shapes}
        # Parameters keep their identity when a trial re-points their data, and when blocks
        # are dropped their names shift; this maps each searched weight back to its tensor.
        self.fqn_of_param = {id(self.weight(fqn)): fqn for fqn in self.shapes}
        inner = getattr(model, "model", None)
        self.all_layers = list(getattr(inner, "layers", []) or [])
        self.n_layers = len(self.all_layers)
        self.layer_types = list(getattr(model.config, "layer_types", None) or [])
        self.prepare_seconds = 0.0
        self.hits = self.misses = 0

    def weight(self, fqn: str) -> torch.nn.Parameter:
        return self.params[fqn]

    def get(self, fqn: str, fmt: str) -> np.ndarray:
        """Packed variant of tensor `fqn` in format `fmt`, quantized on first use."""
        key = (fqn, fmt)
        if key not in self.packed:
            t0 = time.perf_counter()
            self.packed[key] = get_format(fmt).quantize(self.base[fqn].numpy())
            self.prepare_seconds += time.perf_counter() - t0
        return self.packed[key]

    def prepare(self, pairs: Iterable[tuple[str, str]], progress=None) -> None:
        """Quantize every pair now; also fill the dense level while it has room, so the
        first trials swap pointers instead of dequantizing on the hot path."""
        for fqn, fmt in pairs:
            self.get(fqn, fmt)
            size = 4 * self.shapes[fqn][0] * self.shapes[fqn][1]
            if (fqn, fmt) not in self.dense and self._dense_used + size <= self.dense_bytes:
                self.dequantized(fqn, fmt)
            if progress is not None:
                progress.update(1)

    def dequantized(self, fqn: str, fmt: str | None) -> torch.Tensor:
        """float32 weights of `fqn` in format `fmt` (None: the base weights). Do not modify."""
        if fmt is None:
            return self.base[fqn]
        key = (fqn, fmt)
        if key in self.dense:
            self.hits += 1
            self.dense.move_to_end(key)
            return self.dense[key]
        self.misses += 1
        packed, shape = self.get(fqn, fmt), self.shapes[fqn]
        out = dequantize_torch(fmt, packed, shape)
        if out is None:  # formats without a torch path use the reference numpy one
            out = torch.from_numpy(get_format(fmt).dequantize(packed, shape))
        self._remember(key, out)
        return out

    def _remember(self, key: tuple[str, str], t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.dense_bytes:
            return
        while self._dense_used + size > self.dense_bytes:
            _, old = self.dense.popitem(last=False)
            self._dense_used -= old.numel() * old.element_size()
        self.dense[key] = t
        self._dense_used += size

    @property
    def nbytes(self) -> int:
        """Bytes held by packed variants (base weights and the dense LRU not counted)."""
        return int(sum(a.nbytes for a in self.packed.values()))
