"""Quality evaluators: perplexity on evaluation windows, KL(base || candidate) on calibration.

The tensor math is in plain functions (`window_nll`, `kl_per_token`); the classes only hold
the windows, and for KL the base model's log-probabilities, computed once per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from llmpareto.evaluators.base import Candidate


def _batches(windows: np.ndarray, batch_size: int):
    for i in range(0, len(windows), batch_size):
        yield torch.from_numpy(windows[i : i + batch_size])


@torch.inference_mode()
def window_nll(model: torch.nn.Module, windows: np.ndarray, batch_size: int = 4) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) over windows, and the token count."""
    total, count = 0.0, 0
    for ids in _batches(windows, batch_size):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        target = ids[:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum"
        ).item()
        count += target.numel()
    return total, count


@torch.inference_mode()
def log_probs(model: torch.nn.Module, windows: np.ndarray, batch_size: int = 4) -> torch.Tensor:
    """(n_windows, window, vocab) float32 log-probabilities of the next token."""
    out = [torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
           for ids in _batches(windows, batch_size)]
    return torch.cat(out)


def kl_per_token(base_logp: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || candidate) in nats for each position; inputs (..., vocab)."""
    cand_logp = torch.log_softmax(cand_logits.float(), dim=-1)
    return (base_logp.exp() * (base_logp - cand_logp)).sum(-1)


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
        """Compute the base log-probs now (model must hold its base weights)."""
        self._base = log_probs(model, self.windows, self.batch_size)

    @torch.inference_mode()
    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        if self._base is None:
            raise RuntimeError("KLEvaluator.set_base must run on the base model first")
        total, count = 0.0, 0
        for i, ids in enumerate(_batches(self.windows, self.batch_size)):
            logits = candidate.model(input_ids=ids, use_cache=False).logits
            base = self._base[i * self.batch_size : i * self.batch_size + len(ids)]
            kl = kl_per_token(base, logits)
            total += kl.sum().item()
            count += kl.numel()
        return {"kl_nats": total / count}
