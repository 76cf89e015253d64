"""Prepared-variant cache: each (tensor, format) is quantized once per run (EvoPress-style).

Variants are held as their packed codes (the exact bytes a GGUF file stores), never as one
float32 copy per format, so memory is about params x sum(bits per weight)/8 over the formats
used. A trial dequantizes only the tensors whose format changed since the last trial.
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import torch

from llmpareto.arch import Arch
from llmpareto.formats import get_format


class VariantCache:
    """Base weights of one model plus its prepared (tensor, format) variants."""

    def __init__(self, model: torch.nn.Module, arch: Arch) -> None:
        self.model = model
        self.arch = arch
        self.shapes = {t.fqn: (t.rows, t.cols) for t in arch.tensors}
        # The base weights are kept as float32 numpy views; the model's own tensors get
        # overwritten by trials, so they are cloned once here.
        self.base: dict[str, np.ndarray] = {
            fqn: self.weight(fqn).detach().clone().numpy() for fqn in self.shapes
        }
        self.packed: dict[tuple[str, str], np.ndarray] = {}
        self.current: dict[str, str | None] = {fqn: None for fqn in self.shapes}
        self.prepare_seconds = 0.0

    def weight(self, fqn: str) -> torch.Tensor:
        return self.model.get_submodule(fqn).weight

    def get(self, fqn: str, fmt: str) -> np.ndarray:
        """Packed variant of tensor `fqn` in format `fmt`, quantized on first use."""
        key = (fqn, fmt)
        if key not in self.packed:
            t0 = time.perf_counter()
            self.packed[key] = get_format(fmt).quantize(self.base[fqn])
            self.prepare_seconds += time.perf_counter() - t0
        return self.packed[key]

    def prepare(self, pairs: Iterable[tuple[str, str]], progress=None) -> None:  # noqa: ANN001
        for fqn, fmt in pairs:
            self.get(fqn, fmt)
            if progress is not None:
                progress.update(1)

    def dequantized(self, fqn: str, fmt: str | None) -> np.ndarray:
        if fmt is None:
            return self.base[fqn]
        return get_format(fmt).dequantize(self.get(fqn, fmt), self.shapes[fqn])

    @property
    def nbytes(self) -> int:
        """Bytes held by prepared variants (base weights not counted)."""
        return int(sum(a.nbytes for a in self.packed.values()))
