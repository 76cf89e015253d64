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


def _llama(path: str, n_ctx: int, threads: int | None, logits_all: bool = False,
           gpu_layers: int = 0):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("measuring needs llama-cpp-python: pip install llama-cpp-python") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                 n_threads=threads or os.cpu_count(), logits_all=logits_all, verbose=False,
                 n_gpu_layers=gpu_layers)


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
    """Prompt tokens/s, and decode ms/token with `context` tokens in the KV cache (the
    cost model's Workload.context): see `gguf_speeds`."""
    return gguf_speeds([path], prompt_tokens, decode_tokens, (context,), threads, rounds)[0]


def gguf_speeds(paths: list[str], prompt_tokens: int = 128, decode_tokens: int = 64,
                contexts: tuple[int, ...] = (256,), threads: int | None = None,
                rounds: int = 3, gpu_layers: int = 0) -> list[dict[str, float]]:
    """Per file: prompt tokens/s, and decode ms/token at each KV length in `contexts`
    (`measured_latency_ms` at the first, `measured_latency_ms@C` at each C), best of `rounds`;
    decode timed with llama-bench's loop (DECODE_LOOP, `bench_decode`).

    Rounds go over all the files in turn (a, b, c, a, b, c, ...), so a stretch of load from
    other processes slows every file a little rather than one file a lot; a shared machine
    only ever makes a run slower, so each file's fastest round is the closest to the machine's
    own speed. Each round loads the file afresh. `gpu_layers` blocks run on the GPU of a GPU
    build of llama.cpp (-1: all of them, as `-ngl 99`)."""
    runs: list[list[dict[str, float]]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, path in enumerate(paths):
            runs[i].append(_speed_once(path, prompt_tokens, decode_tokens, contexts, threads,
                                       gpu_layers))
    best = [{k: (max if k.endswith("_per_s") else min)(r[k] for r in rs) for k in rs[0]}
            for rs in runs]
    for b in best:
        b["measured_latency_ms"] = b[f"measured_latency_ms@{contexts[0]}"]
        b["measured_decode_tokens_per_s"] = 1e3 / b["measured_latency_ms"]
    return best


DECODE_LOOP = ("llama-bench's token loop: per token one llama_decode of a one-token batch and "
               "llama_synchronize, through llama.cpp's C API with no logits read, the mean over "
               "the steps (tools/llama-bench, test_gen)")


def bench_decode(llm, tokens: list[int]) -> float:
    """Seconds per token of decoding `tokens` one at a time from where `llm`'s KV cache stands,
    the way llama-bench's text-generation test does (DECODE_LOOP): llama_decode on a batch of
    one token, then llama_synchronize (a GPU backend returns from llama_decode before its
    kernels finish), nothing read back. Python adds a few microseconds of ctypes calls a
    token (llama-bench's own loop: none); the high-level `Llama.eval` adds its batch filling
    and bookkeeping on top. `llm`'s token count follows, so later `eval` calls continue."""
    import llama_cpp

    ctx = llm._ctx.ctx
    one = (llama_cpp.llama_token * 1)()
    decode, sync, get_one = llama_cpp.llama_decode, llama_cpp.llama_synchronize, \
        llama_cpp.llama_batch_get_one
    t0 = time.perf_counter()
    for t in tokens:
        one[0] = t
        if decode(ctx, get_one(one, 1)) != 0:
            raise RuntimeError("llama_decode failed while timing decode")
        sync(ctx)
    seconds = (time.perf_counter() - t0) / len(tokens)
    llm.input_ids[llm.n_tokens:llm.n_tokens + len(tokens)] = tokens
    llm.n_tokens += len(tokens)
    return seconds


def _speed_once(path: str, prompt_tokens: int, decode_tokens: int, contexts: tuple[int, ...],
                threads: int | None, gpu_layers: int = 0) -> dict[str, float]:
    """Time the prompt, then for each KV length C (ascending) fill the cache to just below C
    and time `decode_tokens` single-token steps around it with llama-bench's loop
    (`bench_decode`)."""
    n_ctx = max(*contexts, prompt_tokens) + decode_tokens + 8
    llm = _llama(path, n_ctx, threads, gpu_layers=gpu_layers)
    tokens = np.random.default_rng(0).integers(10, llm.n_vocab(), n_ctx).tolist()
    llm.eval(tokens[:8])  # warm-up: kernels, caches
    bench_decode(llm, tokens[8:9])  # and the one-token graph (llama-bench's warm-up too)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens[:prompt_tokens])
    out = {"measured_prompt_tokens_per_s": prompt_tokens / (time.perf_counter() - t0)}
    pos = prompt_tokens
    for c in sorted(contexts):
        fill = max(pos, c - decode_tokens // 2)
        if fill > pos:
            llm.eval(tokens[pos:fill])
            pos = fill
        out[f"measured_latency_ms@{c}"] = 1e3 * bench_decode(llm, tokens[pos:pos + decode_tokens])
        pos += decode_tokens
    if hasattr(llm, "close"):
        llm.close()  # free GPU memory now, not whenever the object is collected
    return out


@dataclass
class LlamaCppEvaluator:
    windows: np.ndarray
    threads: int | None = None
    context: int = 256  # KV length decode is timed at: the run's Workload.context
    prompt_tokens: int = 128

    metrics: ClassVar[tuple[str, ...]] = ("measured_perplexity", "measured_latency_ms",
                                          "measured_decode_tokens_per_s",
                                          "measured_prompt_tokens_per_s")
    needs_model: ClassVar[bool] = False  # needs an exported GGUF file instead

    def evaluate_file(self, path: str) -> dict[str, float]:
        out = gguf_speed(path, prompt_tokens=self.prompt_tokens, context=self.context,
                         threads=self.threads)
        out["measured_perplexity"] = gguf_perplexity(path, self.windows, self.threads)
        return {k: out[k] for k in self.metrics}
