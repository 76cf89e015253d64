"""Analytic cost evaluators: no model weights needed, microseconds per call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmpareto.arch import Arch
from llmpareto.evaluators.base import Candidate
from llmpareto.formats import get_format

KV_BYTES_PER_VALUE = 2  # f16 KV cache, as llama.cpp and transformers keep it by default


def weights_bytes(arch: Arch, formats: dict[str, str | None]) -> int:
    """Exact stored bytes of all weights: searched tensors at their formats, the rest f32."""
    total = 0
    for t in arch.tensors:
        fmt = formats.get(t.fqn)
        if fmt is None:
            total += int(t.numel * arch.source_bytes_per_weight)
        else:
            total += get_format(fmt).nbytes(t.rows, t.cols)
    return total + 4 * arch.other_params  # norms stay f32 (GGUF keeps them F32 too)


def kv_cache_bytes(arch: Arch, context: int, bytes_per_value: int = KV_BYTES_PER_VALUE) -> int:
    """K and V for every layer and KV head: 2 * layers * kv_heads * head_dim * bytes * context."""
    return 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * bytes_per_value * context


@dataclass
class MemoryEvaluator:
    arch: Arch
    context: int

    metrics: ClassVar[tuple[str, ...]] = ("memory_bytes", "weights_bytes", "kv_cache_bytes")
    needs_model: ClassVar[bool] = False

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        w = weights_bytes(self.arch, candidate.formats)
        kv = kv_cache_bytes(self.arch, self.context)
        return {"memory_bytes": float(w + kv), "weights_bytes": float(w), "kv_cache_bytes": float(kv)}
