"""Quality evaluators: perplexity and KL(base || candidate) on evaluation windows, which no
quantizer calibrates and no recovery trains on.

The tensor math is in plain functions (`window_nll`, `kl_per_token`); the classes only hold
the windows, and for KL the base model's float64 log-probabilities, computed once per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from llmpareto.evaluators.base import Candidate
from llmpareto.placement import ids_on


def _batches(model: torch.nn.Module, windows: np.ndarray, batch_size: int):
    """Windows in batches, on the model's device (the same numbers on every device)."""
    for i in range(0, len(windows), batch_size):
        yield ids_on(model, windows[i : i + batch_size])


@torch.inference_mode()
def window_nll(model: torch.nn.Module, windows: np.ndarray, batch_size: int = 4) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) over windows, and the token count."""
    total, count = 0.0, 0
    for ids in _batches(model, windows, batch_size):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        target = ids[:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum"
        ).item()
        count += target.numel()
    return total, count


@torch.inference_mode()
def logits_of(model: torch.nn.Module, windows: np.ndarray, batch_size: int = 4) -> torch.Tensor:
    """(n_windows, window, vocab) float32 next-token logits."""
    return torch.cat([model(input_ids=ids, use_cache=False).logits.float()
                      for ids in _batches(model, windows, batch_size)])


def log_probs64(logits: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax over the vocabulary: both sides of a KL take this same path."""
    return torch.log_softmax(logits.double(), dim=-1)


def kl_per_token(base_logp: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || candidate) in nats for each position (float64); base as `log_probs64` of the
    base logits, the candidate as logits, (..., vocab).

    Identical logits give exactly 0 (the same float64 path on the same numbers). Each token's
    KL is clamped at 0: mathematically it is >= 0, and a tiny negative value can only be
    rounding (float sums differ between CPUs), never information."""
    cand_logp = log_probs64(cand_logits)
    return (base_logp.exp() * (base_logp - cand_logp)).sum(-1).clamp_min(0.0)


@torch.inference_mode()
def text_scores(model: torch.nn.Module, windows: np.ndarray, base_logp: torch.Tensor,
                batch_size: int = 4) -> dict[str, float]:
    """Perplexity and mean KL(base || model) per token (nats) on `windows` in one pass;
    `base_logp`: `log_probs64` of the base model's logits on the same windows."""
    nll, n, kl_sum, kl_n = 0.0, 0, 0.0, 0
    for i, ids in enumerate(_batches(model, windows, batch_size)):
        logits = model(input_ids=ids, use_cache=False).logits
        target = ids[:, 1:]
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               target.reshape(-1), reduction="sum").item()
        n += target.numel()
        kl = kl_per_token(base_logp[i * batch_size: i * batch_size + len(ids)], logits)
        kl_sum += float(kl.sum())
        kl_n += kl.numel()
    return {"perplexity": math.exp(nll / n), "kl_nats": kl_sum / kl_n}


@dataclass
class PerplexityEvaluator:
    windows: np.ndarray
    batch_size: int = 4

    metrics: ClassVar[tuple[str, ...]] = ("perplexity",)
    needs_model: ClassVar[bool] = True

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        nll, n = window_nll(candidate.model, self.windows, self.batch_size)
        return {"perplexity": math.exp(nll / n)}


@dataclass
class KLEvaluator:
    windows: np.ndarray
    batch_size: int = 4
    _base: torch.Tensor | None = field(default=None, repr=False)

    metrics: ClassVar[tuple[str, ...]] = ("kl_nats",)
    needs_model: ClassVar[bool] = True

    def set_base(self, model: torch.nn.Module) -> None:
        """Compute the base log-probs now (model must hold its base weights), in float64:
        tokens x vocab x 8 bytes (200 MB for 512 tokens of a 49k vocabulary), once per run
        rather than a float64 log-softmax of the base logits in every trial."""
        self._base = log_probs64(logits_of(model, self.windows, self.batch_size))

    @torch.inference_mode()
    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        if self._base is None:
            raise RuntimeError("KLEvaluator.set_base must run on the base model first")
        total, count = 0.0, 0
        for i, ids in enumerate(_batches(candidate.model, self.windows, self.batch_size)):
            logits = candidate.model(input_ids=ids, use_cache=False).logits
            base = self._base[i * self.batch_size : i * self.batch_size + len(ids)]
            kl = kl_per_token(base, logits)
            total += float(kl.sum())  # float64 sum of non-negative terms: >= 0
            count += kl.numel()
        return {"kl_nats": total / count}
