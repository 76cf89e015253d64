"""Measured evaluator: an exported GGUF run in llama.cpp (llama-cpp-python) on this host.

Decode and prompt tokens/s, and perplexity over the same evaluation windows the search used,
so search-time and runtime numbers sit side by side.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from llmpareto.errors import UserError


def _llama(path: str, n_ctx: int, threads: int | None, logits_all: bool = False):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("measuring needs llama-cpp-python: pip install llama-cpp-python") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                 n_threads=threads or os.cpu_count(), logits_all=logits_all, verbose=False)


def gguf_perplexity(path: str, windows: np.ndarray, threads: int | None = None) -> float:
    """exp(mean next-token NLL) over windows, each evaluated from an empty KV cache."""
    llm = _llama(path, int(windows.shape[1]), threads, logits_all=True)
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return math.exp(total / count)


def gguf_speed(path: str, prompt_tokens: int = 128, decode_tokens: int = 64, context: int = 256,
               threads: int | None = None, rounds: int = 3) -> dict[str, float]:
    """Prompt tokens/s and decode ms/token: the best of `rounds` (a shared machine only ever
    makes a run slower, so the fastest round is the closest to the machine's own speed)."""
    runs = [_speed_once(path, prompt_tokens, decode_tokens, context, threads)
            for _ in range(rounds)]
    return {k: (min if k == "measured_latency_ms" else max)(r[k] for r in runs) for k in runs[0]}


def _speed_once(path: str, prompt_tokens: int, decode_tokens: int, context: int,
                threads: int | None) -> dict[str, float]:
    n_ctx = max(context, prompt_tokens + decode_tokens) + 8
    llm = _llama(path, n_ctx, threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, llm.n_vocab(), prompt_tokens).tolist()
    llm.eval(prompt[:8])  # warm-up: kernels, caches
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t0
    steps = []
    for tok in rng.integers(10, llm.n_vocab(), decode_tokens).tolist():
        t0 = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t0)
    decode_s = float(np.median(steps))
    return {"measured_prompt_tokens_per_s": prompt_tokens / prompt_s,
            "measured_latency_ms": 1e3 * decode_s,
            "measured_decode_tokens_per_s": 1.0 / decode_s}


@dataclass
class LlamaCppEvaluator:
    windows: np.ndarray
    threads: int | None = None

    metrics: ClassVar[tuple[str, ...]] = ("measured_perplexity", "measured_latency_ms",
                                          "measured_decode_tokens_per_s",
                                          "measured_prompt_tokens_per_s")
    needs_model: ClassVar[bool] = False  # needs an exported GGUF file instead

    def evaluate_file(self, path: str) -> dict[str, float]:
        out = gguf_speed(path, threads=self.threads)
        out["measured_perplexity"] = gguf_perplexity(path, self.windows, self.threads)
        return out
